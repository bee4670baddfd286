"""Helpers shared by the test files (not a test module itself)."""

import subprocess
import sys


def run_cli(*args, timeout=120, env=None):
    """Run ``python -m minigpt2 ARGS...`` in a fresh process; the CompletedProcess, text mode."""
    return subprocess.run([sys.executable, "-m", "minigpt2", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
