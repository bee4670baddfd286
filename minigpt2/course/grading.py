"""How a grader talks to the learner: checks that pass print one line, the first that fails
stops with one message and a hint, and the reference is shown only when asked for.

- ``ExerciseFailed``: what failed and a hint. In a notebook it is displayed as those two lines,
  not as a traceback (IPython shows ``_render_traceback_`` when an exception defines it).
- Hints come in two tiers: a nudge the first time a check fails, the full formula when the same
  check fails again, or at once with ``show_hint()``.
- ``_Grader.call`` snapshots every input of the learner's function and reports an input changed
  in place by its name, before anything else is checked.
- ``show_reference(name)``: the project's own code for an exercise, printed on request (the
  worked notebooks call it after the grader has passed).
- ``cmp`` / ``cmp_steps``: compare the intermediate tensors of a backward with the reference's,
  one line each, down to the first that differs (as in Karpathy's "backprop ninja" exercise).
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect

import numpy as np

from ..gradcheck import rel_error

GRAD_TOL = 1e-6    # float64 finite differences with eps = 1e-6: a right backward gives ~1e-9
MATCH_TOL = 1e-9   # float64 against the reference computed the same way
F32_TOL = 1e-4     # float32 against the float64 reference

DTYPE_HINT = ("NumPy promotes float32 to float64 when it meets a float64 array or scalar "
              "(np.sqrt(...) of a Python number, 1.0 / np.sqrt(hs), np.float64(...), "
              "np.zeros(shape) without dtype=) or an int64 count (valid.sum()): use Python "
              "floats (math.sqrt, float(n)) for constants and dtype=x.dtype for new arrays")


class ExerciseFailed(AssertionError):
    """A grader found the learner's function wrong (or not written yet).

    ``title``: the exercise; ``what``: the check that failed; ``hint``: what to look at."""

    def __init__(self, title: str, what: str, hint: str):
        super().__init__(f"{title}: {what}. Hint: {hint}")
        self.title, self.what, self.hint = title, what, hint

    def _render_traceback_(self):
        """What IPython displays instead of a traceback: the verdict, in two lines."""
        return [f"ExerciseFailed ({self.title}): {self.what}", f"  hint: {self.hint}"]


# (exercise, nudge) -> how often that check has failed in this session: the second time the
# full hint is given. _LAST: the last failure, for show_hint().
_TIMES_FAILED: dict = {}
_LAST: dict = {}
# exercise name -> (["module:attribute", ...], a sentence): filled by the graders' modules
REFERENCES: dict = {}


def show_hint() -> None:
    """Print the full hint of the check that failed last."""
    if not _LAST:
        print("no check has failed yet")
        return
    print(f"{_LAST['title']}: {_LAST['what']}\n  full hint: {_LAST['full']}")


def show_reference(name: str) -> None:
    """Print the project's own code for the exercise ``name`` (e.g. "layernorm")."""
    if name not in REFERENCES:
        raise ValueError(f"no exercise named {name!r}; one of: {', '.join(sorted(REFERENCES))}")
    paths, note = REFERENCES[name]
    if note:
        print(f"# {note}\n")
    for path in paths:
        module, _, attribute = path.partition(":")
        obj = importlib.import_module(module)
        for part in attribute.split("."):
            obj = getattr(obj, part)
        print(inspect.getsource(obj))


def reset_hints() -> None:
    """Forget which checks failed (the next failure gives the nudge again)."""
    _TIMES_FAILED.clear()
    _LAST.clear()


def _snapshot(value):
    """A copy of an input the learner's function must not change, or None if not comparable."""
    if isinstance(value, (np.ndarray, dict, list)):
        try:
            return copy.deepcopy(value)
        except Exception:   # an object that cannot be copied is not checked
            return None
    return None


def _same(a, b) -> bool:
    if isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype
                and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(b, dict):
        return isinstance(a, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, list):
        return isinstance(a, list) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def _argument_names(fn, args) -> list[str]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [names[i] if i < len(names) else f"argument {i + 1}" for i in range(len(args))]


class _Grader:
    """Prints each check as it passes and raises ``ExerciseFailed`` at the first that fails."""

    def __init__(self, title: str):
        self.title = title
        self.n_passed = 0
        print(f"{title}:")

    def ok(self, what: str) -> None:
        self.n_passed += 1
        print(f"  ok    {what}")

    def fail(self, what: str, hint: str, full: str | None = None):
        """Stop with ``what``. ``hint`` is the nudge; ``full`` (the formula) is given instead
        when the same check fails a second time, and by ``show_hint()`` at any time."""
        full = full or hint
        key = (self.title, hint)
        _TIMES_FAILED[key] = _TIMES_FAILED.get(key, 0) + 1
        _LAST.update(title=self.title, what=what, full=full)
        if full != hint and _TIMES_FAILED[key] == 1:
            shown = f"{hint} (show_hint() gives the full formula)"
        else:
            shown = full
        raise ExerciseFailed(self.title, what, shown)

    def call(self, fn, *args, may_change=(), watch=None, crash_hint=None):
        """fn(*args): a stub or a crash becomes a verdict; then every array, dict or list among
        the arguments (and the arrays of ``watch``, {name: array} reachable through a cache) is
        compared with its snapshot, except the arguments at the positions ``may_change``."""
        name = getattr(fn, "__name__", "your function")
        names = _argument_names(fn, args)
        watched = {n: a for i, (n, a) in enumerate(zip(names, args)) if i not in may_change}
        watched.update(watch or {})
        before = {n: _snapshot(a) for n, a in watched.items()}
        try:
            out = fn(*args)
        except NotImplementedError:
            self.fail(f"{name} is not written yet (it raises NotImplementedError)",
                      "replace the `raise NotImplementedError` line with your code, run that "
                      "cell, then this one")
        except ExerciseFailed:
            raise
        except Exception as e:  # the learner's bug, reported as a verdict, not a traceback
            self.fail(f"{name} raised {type(e).__name__}: {e}",
                      crash_hint or "run it on the small example in the cell above and read "
                      "the traceback")
        for n, snap in before.items():
            self.unchanged(name, n, watched[n], snap)
        return out

    def unchanged(self, fn_name: str, name: str, value, snapshot) -> None:
        """Fail if the input ``name`` of ``fn_name`` differs from its snapshot."""
        if snapshot is not None and not _same(value, snapshot):
            self.fail(f"{fn_name} changed its input `{name}` in place",
                      "work on a copy (words = dict(words)): the caller still needs its "
                      "dict" if isinstance(snapshot, dict) else
                      "the caller still needs its inputs: x = x - mean makes a new array, "
                      "x -= mean (or x[...] = ...) overwrites the caller's")

    def shape(self, what: str, got, want_shape) -> None:
        got_shape = getattr(got, "shape", None)
        if got_shape is None:
            self.fail(f"{what} is a {type(got).__name__}, not an array", "return NumPy arrays")
        if tuple(got_shape) != tuple(want_shape):
            self.fail(f"{what} has shape {tuple(got_shape)}, expected {tuple(want_shape)}",
                      "check the axes you sum over and the order of the matrix product")

    def close(self, what: str, got, want, tol: float, hint: str, full: str | None = None):
        """Shape check, then ||got - want|| / ||want|| <= tol."""
        self.shape(what, got, np.shape(want))
        got = np.asarray(got)
        if not np.all(np.isfinite(got)):
            self.fail(f"{what} holds inf or NaN", hint, full)
        err = rel_error(got, want)
        if not err <= tol:
            self.fail(f"{what}: relative error {err:.2e} (limit {tol:.0e})", hint, full)
        self.ok(f"{what}: relative error {err:.1e}")
        return err

    def dtype(self, what: str, got, want=np.float32) -> None:
        if np.asarray(got).dtype != want:
            self.fail(f"{what} is {np.asarray(got).dtype}, expected {np.dtype(want)} "
                      f"(float32 in, float32 out)", DTYPE_HINT)
        self.ok(f"{what} stays {np.dtype(want)}")

    def dtypes(self, what: str, arrays: dict, want=np.float32) -> None:
        """The dtype of every returned array, each named in the verdict."""
        for name, a in arrays.items():
            if np.asarray(a).dtype != want:
                self.fail(f"{what}: {name} is {np.asarray(a).dtype}, expected {np.dtype(want)} "
                          f"(float32 in, float32 out)", DTYPE_HINT)
        self.ok(f"{what}: {', '.join(arrays)} stay {np.dtype(want)}")

    def done(self) -> None:
        n = self.n_passed
        print(f"  all {n} check{'s' if n != 1 else ''} passed")


def grader(reference_name: str):
    """Decorate a grader: after it passes, say how to see the reference."""
    def wrap(check):
        @functools.wraps(check)
        def run(*args, **kwargs):
            check(*args, **kwargs)
            print(f"  the project's version: show_reference({reference_name!r})")
        return run
    return wrap


# ----------------------------------------------------------------------------------------------
# comparing a backward step by step


def cmp(name: str, mine, want, tol: float = 1e-6) -> bool:
    """One line: does the learner's tensor ``mine`` equal the reference's ``want``?"""
    mine_shape, want_shape = np.shape(mine), np.shape(want)
    if mine_shape != want_shape:
        print(f"{name:>14}  DIFFERS  shape {mine_shape}, expected {want_shape}")
        return False
    a, b = np.asarray(mine, dtype=np.float64), np.asarray(want, dtype=np.float64)
    exact = bool(np.array_equal(a, b))
    err = 0.0 if exact else rel_error(a, b)
    same = exact or err <= tol
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    print(f"{name:>14}  {'ok     ' if same else 'DIFFERS'}  exact {str(exact):5}  "
          f"max |diff| {diff:.1e}  relative error {err:.1e}")
    return same


def cmp_steps(mine: dict, want: dict, tol: float = 1e-6) -> str | None:
    """Compare the learner's intermediate tensors with the reference's (``reference_steps``),
    in the reference's order, stopping at the first that differs; returns its name (None if
    all agree). A name missing from ``mine`` is skipped."""
    for name, ref in want.items():
        if name not in mine:
            print(f"{name:>14}  (not in yours, skipped)")
            continue
        if not cmp(name, mine[name], ref, tol):
            print(f"first difference: {name}; every step before it agrees")
            return name
    print("every step agrees")
    return None
