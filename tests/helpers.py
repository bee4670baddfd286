"""Helpers shared by the test files (not a test module itself)."""

import subprocess
import sys

import numpy as np

from minigpt2.gradcheck import numerical_gradient, rel_error

TOL = 1e-6


def run_cli(*args, timeout=120, env=None):
    """Run ``python -m minigpt2 ARGS...`` in a fresh process; the CompletedProcess, text mode."""
    return subprocess.run([sys.executable, "-m", "minigpt2", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def one_line_error(r, *fragments):
    """Assert that a command (returncode, stderr) failed with status 2 and one stderr line holding
    every fragment; return that line."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_grads(forward, backward, arrays, names, tol=TOL):
    """Check backward's gradients for the named entries of ``arrays`` (a dict of float64 arrays).

    forward(arrays) -> (out, cache); backward(g, cache) -> dict name -> gradient.
    """
    rng = np.random.default_rng(123)
    out, cache = forward(arrays)
    g = rng.standard_normal(np.shape(out))
    analytic = backward(g, cache)

    def loss():
        return np.sum(forward(arrays)[0] * g)

    for name in names:
        numeric = numerical_gradient(loss, arrays[name])
        err = rel_error(analytic[name], numeric)
        assert err < tol, f"gradient of {name}: relative error {err:.2e} >= {tol:.0e}"


def prepare_corpus(inputs, out, log=lambda *_: None, **settings):
    """``prepare_shards`` of ``inputs`` into ``out`` with these settings, quietly."""
    from minigpt2.data.prepare import PrepareSettings, prepare_shards
    return prepare_shards(PrepareSettings(inputs, out, **settings), log=log)
