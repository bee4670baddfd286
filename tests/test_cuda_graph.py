"""fast/cuda_graph.GraphedStep's control flow on the CPU, with a stand-in for CuPy's stream
capture (the capture itself needs a GPU): warm-up calls run the step, one capture, replays
after it, and the fallback when a capture fails, with its reason."""

import types

import pytest

from minigpt2.fast.cuda_graph import GraphedStep


def fake_cupy(fail=None):
    """CuPy's Stream/Graph calls GraphedStep makes; ``fail``: "begin" or "step" makes the capture
    fail there, as a host sync or an allocation inside a capture does on a GPU."""
    log = []

    class Graph:
        def launch(self, stream):
            log.append("replay")

    class Stream:
        def __init__(self, non_blocking=False):
            self.capturing = False

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def begin_capture(self):
            if fail == "begin":
                raise RuntimeError("cudaErrorStreamCaptureUnsupported")
            self.capturing = True
            log.append("begin")

        def end_capture(self):
            self.capturing = False
            log.append("end")
            return Graph()

    cp = types.SimpleNamespace(cuda=types.SimpleNamespace(Stream=Stream))
    return cp, log


def test_warmup_then_one_capture_then_replays():
    cp, log = fake_cupy()
    graphed = GraphedStep(lambda: log.append("step") or "loss", cp, warmup=2)
    assert [graphed() for _ in range(5)] == ["loss", "loss", None, None, None]
    assert log == ["step", "step", "begin", "step", "end", "replay", "replay", "replay"]
    assert graphed.fallback_reason is None and graphed.graph is not None


@pytest.mark.parametrize("where", ["begin", "step"])
def test_a_failed_capture_falls_back_for_good_and_says_why(where):
    cp, log = fake_cupy(fail="begin" if where == "begin" else None)

    def step():
        log.append("step")
        if where == "step" and graphed.calls > 1 and not log.count("end"):
            raise RuntimeError("operation not permitted when stream is capturing")
        return "loss"

    graphed = GraphedStep(step, cp, warmup=1)
    assert [graphed() for _ in range(4)] == ["loss"] * 4
    assert graphed.graph is None and "RuntimeError" in graphed.fallback_reason
    assert "replay" not in log
    if where == "step":                              # the capture was ended, not left open
        assert log.count("begin") == log.count("end") == 1


def test_warmup_must_compile_first():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(lambda: None, fake_cupy()[0], warmup=0)
