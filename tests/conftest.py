"""Shared test set-up: tests marked ``gpu`` are skipped, with the reason, without CuPy or a GPU;
the ``emu`` fixture gives the kernel modules over the CUDA emulator."""

import pytest


def _gpu_skip_reason():
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install -e '.[gpu]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA GPU"
    except Exception as e:  # no driver or no device
        return f"CuPy cannot reach a CUDA GPU ({type(e).__name__})"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = _gpu_skip_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def emu():
    """minigpt2.fast's kernel modules (kernels, flash_kernels, gpu_layers) over the CUDA
    emulator, for one test module (tests/emulated_cupy.py)."""
    from emulated_cupy import emulated
    with emulated() as e:
        yield e
