"""Finite-difference gradient checking: how every backward in minigpt2 is verified.

For a scalar function f of an array x, the central difference
    (f(x + eps e_i) - f(x - eps e_i)) / (2 eps)
approximates df/dx_i with error O(eps^2). In float64 with eps ~ 1e-6 this agrees with a correct
analytic gradient to ~1e-9 relative, while a wrong derivative is usually off by far more than 1e-6.

To check a layer whose output is an array, pick a random upstream gradient g (same shape as the
output) and check the scalar L = sum(out * g): its gradient with respect to the inputs is exactly
what ``x_backward(g, cache)`` returns.
"""

from __future__ import annotations

import numpy as np

from .backend import to_numpy


def rel_error(a, b) -> float:
    """||a - b|| / ||b|| (or ||a|| when b is all zeros): the error measure used in every check."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom > 0 else float(np.linalg.norm(a))


def numerical_gradient(f, x, eps=1e-6, indices=None):
    """Central-difference gradient of the scalar ``f()`` with respect to the array ``x``.

    ``x`` is perturbed in place (and restored), so ``f`` must read it. ``indices``: flat indices
    to probe (all when None). Returns an array shaped like x (all) or (len(indices),).
    """
    if not (isinstance(x, np.ndarray) and x.flags.c_contiguous):
        raise ValueError("numerical_gradient needs a C-contiguous NumPy array to perturb in place")
    flat = x.reshape(-1)  # a view: writing to it perturbs x
    probe = range(flat.size) if indices is None else indices
    out = np.empty(len(probe), dtype=np.float64)
    for n, i in enumerate(probe):
        old = flat[i].copy()
        flat[i] = old + eps
        f_plus = float(f())
        flat[i] = old - eps
        f_minus = float(f())
        flat[i] = old
        out[n] = (f_plus - f_minus) / (2 * eps)
    return out.reshape(x.shape) if indices is None else out
