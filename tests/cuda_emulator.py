"""A CUDA emulator for the tests: the kernel source strings CuPy compiles (``RawModule`` and
``ElementwiseKernel`` code of ``minigpt2/fast``) compiled with the machine's g++ and run on NumPy
arrays, with CUDA's semantics, so that every kernel is checked on every CI run without a GPU.

How it works
    ``RawModule(code=..., name_expressions=[...])`` writes one C++ file: the prelude
    ``cuda_emulator.h`` (threadIdx/blockIdx/blockDim/gridDim, ``__shared__``, ``__syncthreads``,
    warp shuffles, atomics, float16 with round-to-nearest-even), the kernel text as CuPy gets it
    (``extern __shared__ T name[];`` becomes a pointer to the block's dynamic shared memory; a
    ``__shared__`` declaration, which must be inside a kernel, is followed by its poisoning), and
    one exported launch function per template instance. g++ builds it into a shared library,
    cached by the hash of all of that (``$MINIGPT2_EMULATOR_CACHE``, default under the temporary
    folder), and ctypes calls it. A block runs as blockDim fibers on one OS thread; between two
    synchronisation points the fibers run in a seeded random order, and shared memory is filled
    with NaN bytes before each block: a missing barrier or an unwritten shared read changes the
    result. See the prelude's header comment.

What a launch checks (where CUDA would fail, or silently compute garbage)
    grid and block limits (grid y, z <= 65,535; 1,024 threads); dynamic shared memory above 48 KiB
    without the kernel's ``max_dynamic_shared_size_bytes`` opt-in, or above the device's 227 KiB;
    each argument against the kernel's parameter: an array for a pointer, of the pointee's size
    (a float32 array for a ``const unsigned short*`` is an error), C-contiguous; a NumPy scalar of
    the parameter's kind and size for a value. Each array is copied into an exact-size buffer with
    NaN guard zones on both sides: a write past either end is reported, a read returns NaN.
    ``cupy.empty`` of the emulated CuPy (``emulated_cupy``) is NaN-filled, so an output element a
    kernel forgets to write shows.

``ElementwiseKernel(in_params, out_params, body, name, preamble=...)`` is a C++ loop over the
elements with CuPy's declarations (``T x`` an element, ``raw T z`` the array, ``i`` the index);
it has no threads to race.

Adding a primitive (a warp collective like ``mma.sync``, ``ldmatrix``, or any PTX)
    In the kernel source, wrap the PTX in a small ``__device__`` function inside
    ``#ifndef MINIGPT2_EMULATOR ... #endif`` (as ``half_to_float`` in cuda_source.py), and give the
    prelude a C++ function of the same signature. A warp collective calls
    ``emu::warp_exchange(mask, &mine, sizeof(mine))``: each lane leaves up to ``emu::SLOT_BYTES``
    bytes and waits until every lane of the mask has; it returns the warp's 32 slots (valid until
    the lane's next collective), from which the lane computes its own result (an ``mma.sync``
    reads the fragments of A, B and C of all lanes, multiplies, and keeps its lane's part of D;
    ``emu::warp_gather`` copies the 32 slots out). Lane and warp:
    ``emu::cur->lane``, ``emu::cur->warp``. Then add a test against a NumPy form of it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

PRELUDE = Path(__file__).with_name("cuda_emulator.h")
CXX = os.environ.get("CXX", "g++")
FLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0",
         "-Wno-unknown-pragmas", "-Wno-attributes")
SHARED_DEFAULT = 48 * 1024        # dynamic + static shared memory without the opt-in
SHARED_OPT_IN = 227 * 1024        # the most an H100/H200 block can opt in to
GUARD = 1 << 16                   # NaN bytes on each side of every array argument
SEED = int(os.environ.get("MINIGPT2_EMULATOR_SEED", "0"))
_lock = threading.Lock()          # one launch at a time: the prelude's scheduler is global


class EmulatorError(RuntimeError):
    """A launch CUDA would refuse, or a fault the emulator detected in a kernel."""


def cache_dir() -> Path:
    d = Path(os.environ.get("MINIGPT2_EMULATOR_CACHE",
                            Path(tempfile.gettempdir()) / "minigpt2-cuda-emulator"))
    d.mkdir(parents=True, exist_ok=True)
    return d


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?"
                            r"([\w:<>\s]+?)\s+(\w+)\s*\[\s*\]\s*;")


_SHARED = re.compile(r"(?<!extern )__shared__\s+([^;]+);")


def _declared_names(declarators: str):
    """'A sm[32], ss[32]' -> ['sm', 'ss']: the name before each declarator's brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(declarators + ","):
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(declarators[start:i])
            start = i + 1
    return [re.findall(r"\w+", p.split("[")[0].split("=")[0])[-1] for p in parts]


def translate(code: str) -> str:
    """The kernel text as g++ takes it: dynamic shared memory becomes a pointer; each static
    ``__shared__`` declaration (inside a kernel) is followed by its poisoning, once per block."""
    code = _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(emu::dynamic_smem);", code)
    return _SHARED.sub(lambda m: m.group(0) + "".join(
        f" emu::shared_region({name});" for name in _declared_names(m.group(1))), code)


def build(text: str, tag: str) -> ctypes.CDLL:
    """Compile ``text`` (which includes the prelude) into a shared library, cached by hash."""
    preludes = [p.read_text() for p in sorted(PRELUDE.parent.glob("cuda_emulator*.h"))]
    key = hashlib.sha256("\0".join([*preludes, text, CXX, *FLAGS]).encode())
    lib = cache_dir() / f"{tag}-{key.hexdigest()[:20]}.so"
    if not lib.exists():
        src = lib.with_suffix(f".{os.getpid()}.cpp")      # kept: g++'s errors point into it
        src.write_text(text)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run([CXX, *FLAGS, "-I", str(PRELUDE.parent), "-o", str(tmp),
                                 str(src)], capture_output=True, text=True)
        if result.returncode != 0:
            raise EmulatorError(f"g++ could not compile the kernel source for the emulator:\n"
                                f"{result.stderr[-6000:]}")
        os.replace(tmp, lib)          # atomic: parallel test processes share the cache
    return ctypes.CDLL(str(lib))


def _kernel_name(expression: str) -> str:
    return expression.split("<", 1)[0].strip()


class RawModule:
    """``cupy.RawModule`` for the emulator: the named template instances of ``code``."""

    def __init__(self, code, options=(), name_expressions=(), **_):
        self.names = list(name_expressions)
        exports = "".join(f"\nstatic constexpr auto emu_kernel_{i} = &{n};\nEMU_EXPORT({i})\n"
                          for i, n in enumerate(self.names))
        text = '#include "cuda_emulator.h"\n' + translate(code) + exports
        self.lib = build(text, _kernel_name(self.names[0]) if self.names else "module")

    def get_function(self, name):
        if name not in self.names:
            raise EmulatorError(f"{name!r} is not among the module's name_expressions")
        return Function(self.lib, self.names.index(name), name)


_KIND = {"f": "f", "i": "iu", "u": "iu"}


class Function:
    """One kernel instance; called as CuPy's RawKernel: ``f(grid, block, args, shared_mem=0)``."""

    def __init__(self, lib, index, name):
        self.name = name
        self.max_dynamic_shared_size_bytes = 0     # the opt-in CuPy's Function also exposes
        self._launch = getattr(lib, f"emu_launch_{index}")
        signature = getattr(lib, f"emu_signature_{index}")
        signature.restype = ctypes.c_char_p
        self.params = signature().decode().split(",") if signature() else []
        self.calls = 0

    def _check_geometry(self, grid, block, shared_mem):
        grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        if min(grid + block) < 1:
            raise EmulatorError(f"{self.name}: empty launch grid {grid} block {block}")
        if grid[0] > 2 ** 31 - 1 or grid[1] > 65535 or grid[2] > 65535:
            raise EmulatorError(f"{self.name}: grid {grid} exceeds CUDA's limits "
                                "(x < 2^31, y and z <= 65,535)")
        if np.prod(block) > 1024 or block[2] > 64:
            raise EmulatorError(f"{self.name}: block {block} exceeds 1,024 threads")
        limit = max(SHARED_DEFAULT, min(self.max_dynamic_shared_size_bytes, SHARED_OPT_IN))
        if shared_mem > limit:
            raise EmulatorError(f"{self.name}: {shared_mem} bytes of dynamic shared memory, over "
                                f"the {limit} a launch may ask for (set the kernel's "
                                "max_dynamic_shared_size_bytes to opt in to more)")
        return grid, block

    def _pack(self, args):
        """-> (ctypes pointer array, keep-alive list, [(guarded buffer, array, i)])."""
        if len(args) != len(self.params):
            raise EmulatorError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        values, keep, copies, seen = [], [], [], {}
        for i, (code, a) in enumerate(zip(self.params, args)):
            if code.startswith("p"):
                if not isinstance(a, np.ndarray):
                    raise EmulatorError(f"{self.name}: argument {i} must be an array, got {type(a)}")
                half_words = code == "pu2" and a.dtype == np.float16   # how CuPy passes float16
                if a.itemsize != int(code[2:]) or (a.dtype.kind not in _KIND[code[1]]
                                                   and not half_words):
                    raise EmulatorError(f"{self.name}: argument {i} is {a.dtype}, the kernel "
                                        f"reads it as {code[1:]} (kind, bytes)")
                if not a.flags.c_contiguous:
                    raise EmulatorError(f"{self.name}: argument {i} is not C-contiguous; the "
                                        "kernel would read it as if it were")
                key = (a.__array_interface__["data"][0], a.nbytes)
                if key not in seen:
                    for (ptr, n), _ in seen.items():
                        if ptr < key[0] + key[1] and key[0] < ptr + n:
                            raise EmulatorError(f"{self.name}: argument {i} overlaps another "
                                                "without being the same buffer")
                    buf = np.full(a.nbytes + 2 * GUARD, 0xFF, dtype=np.uint8)
                    buf[GUARD:GUARD + a.nbytes] = a.reshape(-1).view(np.uint8)
                    seen[key] = buf
                    copies.append((buf, a, i))
                values.append(seen[key][GUARD:].ctypes.data)
            else:
                if not isinstance(a, np.generic) or a.itemsize != int(code[1:]) or \
                        a.dtype.kind not in _KIND[code[0]]:
                    raise EmulatorError(f"{self.name}: argument {i} must be a NumPy scalar of "
                                        f"{code} (kind, bytes), got {a!r}")
                box = np.array(a)
                keep.append(box)
                values.append(box.ctypes.data)
        return (ctypes.c_void_p * max(1, len(values)))(*values), keep, copies

    def __call__(self, grid, block, args, shared_mem=0, **_):
        grid, block = self._check_geometry(grid, block, shared_mem)
        pointers, keep, copies = self._pack(args)
        dynamic = np.full(shared_mem + 2 * GUARD, 0xFF, dtype=np.uint8)
        geometry = (ctypes.c_uint * 6)(*grid, *block)
        error = ctypes.create_string_buffer(1000)
        seed = (SEED * 1_000_003 + self.calls) & (2 ** 64 - 1)
        self.calls += 1
        with _lock:
            failed = self._launch(geometry, ctypes.c_ulonglong(shared_mem),
                                  ctypes.c_void_p(dynamic[GUARD:].ctypes.data), pointers,
                                  ctypes.c_ulonglong(seed), error, ctypes.c_int(len(error)))
        if failed:
            raise EmulatorError(f"{self.name}: {error.value.decode()}")
        if (dynamic[:GUARD] != 0xFF).any() or (dynamic[GUARD + shared_mem:] != 0xFF).any():
            raise EmulatorError(f"{self.name}: wrote outside its {shared_mem} bytes of dynamic "
                                "shared memory")
        for buf, a, i in copies:
            n = a.nbytes
            if (buf[:GUARD] != 0xFF).any() or (buf[GUARD + n:] != 0xFF).any():
                raise EmulatorError(f"{self.name}: wrote outside argument {i} ({a.dtype} "
                                    f"{a.shape})")
            a.reshape(-1).view(np.uint8)[...] = buf[GUARD:GUARD + n]


# ---- ElementwiseKernel --------------------------------------------------------------------------

_CTYPE = {"float16": "float16", "float32": "float", "float64": "double", "int64": "long long",
          "int32": "int", "uint8": "unsigned char", "bool": "bool"}


def _params(spec):
    """'raw T z, int64 V' -> [(raw, type, name)]."""
    out = []
    for p in filter(None, (s.strip() for s in spec.split(","))):
        words = p.split()
        out.append((words[0] == "raw", words[-2], words[-1]))
    return out


class ElementwiseKernel:
    """``cupy.ElementwiseKernel`` for the emulator: a C++ loop over the elements."""

    def __init__(self, in_params, out_params, operation, name="kernel", preamble="", **_):
        self.ins, self.outs = _params(in_params), _params(out_params)
        self.operation, self.name, self.preamble = operation, name, preamble
        self._libs = {}

    def _types(self, args):
        """The placeholders (T, A, ...) resolved from the arguments' dtypes, arrays first."""
        types = {}
        for arrays in (True, False):
            for (raw, t, name), a in zip(self.ins + self.outs, args):
                if t in _CTYPE or a is None or isinstance(a, np.ndarray) != arrays:
                    continue
                dt = np.asarray(a).dtype
                if arrays and t in types and types[t] != dt:
                    raise EmulatorError(f"{self.name}: {name} is {dt}, {t} is {types[t]}")
                types.setdefault(t, dt)
        return types

    def _lib(self, types):
        key = tuple(sorted((t, d.name) for t, d in types.items()))
        if key not in self._libs:
            typedefs = "".join(f"typedef {_CTYPE[d.name]} {t}; " for t, d in types.items())
            decls = []
            for k, (raw, t, name) in enumerate(self.ins + self.outs):
                ct = _CTYPE.get(t, t)
                if raw:
                    decls.append(f"{ct}* {name} = ({ct}*)args[{k}];")
                elif k < len(self.ins):     # an element, or a scalar broadcast to all
                    decls.append(f"const {ct} {name} = (({ct}*)args[{k}])[scalar[{k}] ? 0 : i];")
                else:
                    decls.append(f"{ct}& {name} = (({ct}*)args[{k}])[i];")
            text = ('#include "cuda_emulator.h"\n' + self.preamble + "\n"
                    'extern "C" void emu_elementwise(long long n, void** args, const int* scalar) '
                    "{\n" + typedefs + "\nfor (long long i = 0; i < n; ++i) {\n"
                    + "\n".join(decls) + "\n" + self.operation + "\n}\n}\n")
            self._libs[key] = build(text, self.name)
        return self._libs[key]

    def __call__(self, *args, **_):
        n_in = len(self.ins)
        if len(args) not in (n_in, n_in + len(self.outs)):
            raise EmulatorError(f"{self.name} takes {n_in} or {n_in + len(self.outs)} arguments")
        args = list(args) + [None] * (n_in + len(self.outs) - len(args))
        types = self._types(args)
        shapes = [np.shape(a) for (raw, _, _), a in zip(self.ins + self.outs, args)
                  if not raw and isinstance(a, np.ndarray)]
        shape = np.broadcast_shapes(*shapes) if shapes else ()
        size = int(np.prod(shape))
        boxes, scalar, results, copy_back = [], [], [], []
        for k, ((raw, t, name), a) in enumerate(zip(self.ins + self.outs, args)):
            dt = np.dtype(t if t in _CTYPE else types[t])
            if k >= n_in and a is None:
                a = np.full(shape, np.nan, dtype=dt) if dt.kind == "f" else np.empty(shape, dt)
            if k >= n_in:
                results.append(a)
            if isinstance(a, np.ndarray) and (raw or a.shape == shape):
                if a.dtype != dt:
                    raise EmulatorError(f"{self.name}: {name} is {a.dtype}, expected {dt}")
                c = np.ascontiguousarray(a)
                if c is not a:
                    if k >= n_in or raw:
                        copy_back.append((a, c))
                boxes.append(c)
                scalar.append(0)
            elif isinstance(a, np.ndarray) and a.ndim:
                boxes.append(np.ascontiguousarray(np.broadcast_to(a.astype(dt), shape)))
                scalar.append(0)
            else:
                boxes.append(np.array(a, dtype=dt))
                scalar.append(1)
        lib = self._lib(types)
        ptrs = (ctypes.c_void_p * len(boxes))(*[b.ctypes.data for b in boxes])
        flags = (ctypes.c_int * len(boxes))(*scalar)
        lib.emu_elementwise(ctypes.c_longlong(size), ptrs, flags)
        for a, c in copy_back:
            a[...] = c
        return results[0] if len(results) == 1 else tuple(results)
