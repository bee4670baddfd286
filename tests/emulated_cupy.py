"""CuPy's face over NumPy for the CUDA emulator: ``emulated()`` loads ``minigpt2.fast``'s kernel
modules (``kernels``, ``flash_kernels``, ``gpu_layers``) with this module standing in for
``cupy``, so their host code (allocations, launch geometry, arguments) runs unchanged on NumPy
arrays and their CUDA source runs in ``cuda_emulator``.

What is not emulated, and stands in NumPy instead: cuBLAS. ``kernels.batched_matmul`` (float16
stacks through cuBLAS, float32 sums) is replaced by a NumPy float32 matmul rounded to float16;
CuPy's own matmul, einsum and reductions are NumPy's.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import numpy as np

import cuda_emulator

MODULES = ("minigpt2.fast.flash_kernels", "minigpt2.fast.flash_tc_kernels", "minigpt2.fast.kernels",
           "minigpt2.fast.epilogues", "minigpt2.fast.gpu_layers")


def _nan_filled(a):
    if a.dtype.kind in "fc":
        a.fill(np.nan)        # an element a kernel does not write shows as NaN
    return a


def empty(shape, dtype=float, order="C"):
    return _nan_filled(np.empty(shape, dtype=dtype, order=order))


def empty_like(a, dtype=None, order="K", shape=None):
    return _nan_filled(np.empty_like(a, dtype=dtype, order=order, shape=shape))


class _Device:
    # an H200's figure, so that grids sized by the SM count are the device's
    attributes = {"MultiProcessorCount": 132, "MaxSharedMemoryPerBlockOptin": 232448}

    def __init__(self, *_):
        pass


def make_cupy():
    """A module object that answers as ``cupy`` does for the names minigpt2 uses."""
    cp = types.ModuleType("cupy")
    cp.__getattr__ = lambda name: getattr(np, name)       # the array API: NumPy's
    cp.RawModule = cuda_emulator.RawModule
    cp.ElementwiseKernel = cuda_emulator.ElementwiseKernel
    cp.empty, cp.empty_like = empty, empty_like
    cp.asnumpy = np.asarray
    cp.random = np.random
    cp.cuda = types.SimpleNamespace(Device=_Device,
                                    runtime=types.SimpleNamespace(getDeviceCount=lambda: 0))
    cp.__emulated__ = True
    return cp


def batched_matmul(a, b, out):
    """``kernels.batched_matmul`` in NumPy: float16 stacks multiplied with float32 sums."""
    if not a.dtype == b.dtype == out.dtype == np.float16:
        raise ValueError("batched_matmul is for float16 stacks")
    out[...] = (a.astype(np.float32) @ b.astype(np.float32)).astype(np.float16)
    return out


@contextlib.contextmanager
def emulated():
    """Yields a namespace with fresh ``kernels``, ``flash_kernels`` and ``gpu_layers`` bound to
    the emulated CuPy, which answers ``import cupy`` while the block runs; everything is put
    back afterwards."""
    saved = {name: sys.modules.pop(name, None) for name in MODULES + ("cupy",)}
    package = importlib.import_module("minigpt2.fast")
    attrs = {name: getattr(package, name.rsplit(".", 1)[1], None) for name in MODULES}
    sys.modules["cupy"] = make_cupy()
    try:
        loaded = {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in MODULES}
        loaded["kernels"].batched_matmul = batched_matmul
        yield types.SimpleNamespace(cp=sys.modules["cupy"], **loaded)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name, attr in attrs.items():
            short = name.rsplit(".", 1)[1]
            if attr is None:
                if hasattr(package, short):
                    delattr(package, short)
            else:
                setattr(package, short, attr)


def rand(shape, dtype, seed, scale=1.0):
    """Standard normal data of a dtype (never zeros: they hide unwritten outputs)."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)
