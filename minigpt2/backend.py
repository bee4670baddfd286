"""The array backend: NumPy on the CPU, CuPy on a CUDA GPU.

Every layer in minigpt2 is written once against an array module called ``xp``: ``xp`` is either
``numpy`` or ``cupy``, which share (almost) the same API. ``get_xp(device)`` picks it;
``array_module(a)`` tells which module an array belongs to, so functions that receive arrays
never need to be told.

A few operations differ between the two libraries; they live here, each in one small function,
so the reference layer code (layers.py) stays identical on both backends.
"""

from __future__ import annotations

import numpy as np

DEVICES = ("cpu", "gpu", "auto")
DTYPES = ("float32", "float64")


def _import_cupy():
    """Return the ``cupy`` module if it imports and sees at least one CUDA device, else None."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # no driver, no device, broken install: all mean "no usable GPU"
        return None
    return cupy


def gpu_available() -> bool:
    """True when CuPy is installed and a CUDA GPU is visible."""
    return _import_cupy() is not None


def resolve_device(device: str) -> str:
    """Turn ``"cpu" | "gpu" | "auto"`` into ``"cpu"`` or ``"gpu"``, or raise a clear error."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        try:
            import cupy  # noqa: F401
            why = "CuPy is installed but no CUDA GPU is visible"
        except ImportError:
            why = "CuPy is not installed"
        raise RuntimeError(
            f"device='gpu' was requested but {why}. Install the GPU extra matching your CUDA "
            "version (pip install -e '.[gpu]' for CUDA 12, '.[gpu-cuda13]' for CUDA 13) on a "
            "machine with an NVIDIA GPU, or use device='cpu'."
        )
    return device


def get_xp(device: str):
    """The array module for a device: ``numpy`` for ``"cpu"``, ``cupy`` for ``"gpu"``."""
    if resolve_device(device) == "gpu":
        return _import_cupy()
    return np


def resolve_dtype(dtype) -> np.dtype:
    """``"float32"`` (default everywhere) or ``"float64"`` (gradient checks, reference tests)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return np.dtype(name)


def array_module(a):
    """``numpy`` or ``cupy``, whichever ``a`` belongs to (NumPy for anything that is not CuPy)."""
    if type(a).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def to_numpy(a) -> np.ndarray:
    """A NumPy copy of ``a`` (a no-op view for NumPy arrays). Copies device -> host for CuPy."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


# CPU fast paths walk their arrays in blocks of about this many bytes, so that a block and its
# temporaries stay in the L2 cache across the several element-wise passes each one makes,
# instead of streaming the whole array from memory once per pass.
BLOCK_BYTES = 1 << 19


def block_slices(xp, n, item_bytes):
    """Slices cutting n items of item_bytes each into cache-sized blocks (``BLOCK_BYTES``).

    On the GPU there is one block, the whole range: its memory is fast and each extra
    operation is a kernel launch."""
    if xp is not np:
        return [slice(0, n)]
    step = max(1, BLOCK_BYTES // max(1, item_bytes))
    return [slice(i, i + step) for i in range(0, n, step)]


def upload(xp, a):
    """A host (NumPy) array as an array of ``xp``: itself on the CPU; on the GPU, copied through
    page-locked (pinned) host memory, which the GPU reads by DMA without a staging copy."""
    if xp is np:
        return a
    import cupyx
    pinned = cupyx.empty_pinned(a.shape, dtype=a.dtype)
    pinned[...] = a
    out = xp.empty(a.shape, dtype=a.dtype)
    out.set(pinned)
    return out


def scatter_add_rows(xp, out, rows, values):
    """``out[rows[i]] += values[i]`` for every i, summing repeated rows (unlike ``out[rows] += v``).

    out (V, C), rows (N,) integer, values (N, C). This is the backward of an embedding lookup.
    """
    xp.add.at(out, rows, values)     # NumPy's ufunc.at, and CuPy's (atomic adds on the GPU)
    return out
