"""Shared test set-up: tests marked ``gpu`` are skipped, with the reason, without CuPy or a GPU."""

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
