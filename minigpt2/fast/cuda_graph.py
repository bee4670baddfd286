"""A GPU step captured once as a CUDA graph and replayed, with a fallback when it cannot be.

A step of small kernels spends much of its time launching them: each launch costs the host a few
microseconds, and a GPT-2 step has hundreds. A CUDA graph records the kernels of one step (CuPy's
stream capture) and replays them with one launch. It replays the same kernels on the same
memory, so a step can be captured only when

    its device work reads and writes fixed buffers (the batch copied into the same device arrays
    each step; no new result arrays kept from one step to the next),
    it never waits for the host: no ``bool(...)``, ``float(...)``, ``.item()`` or host copy of a
    device value inside it (minigpt2's id range checks and ``LossScaler`` do so: a step with them
    falls back), and
    its memory comes from a pool that graphs accept: ``use_graph_pool()`` (CUDA's stream-ordered
    allocator, ``cupy.cuda.MemoryAsyncPool``); CuPy's default pool cannot allocate during a capture.

``GraphedStep(step)`` runs ``step()`` plainly for ``warmup`` calls (compiling the kernels and
filling the pool), then tries to capture it; if the capture fails for any reason it keeps running
``step()`` plainly and says why in ``fallback_reason``. A captured step's host code runs once, at
the capture, and a replay returns None: ``step`` must do all its work, results included, on the
device. (A failed capture has run the step's host code once without its device work; the
fallback then runs the whole step.)

Not yet run on a GPU: the capture itself awaits a device; the fallback is tested on the CPU.
"""

from __future__ import annotations


def use_graph_pool(cupy):
    """Route CuPy's allocations through CUDA's stream-ordered allocator, which stream capture
    accepts (``cupy.cuda.MemoryAsyncPool``). Returns the pool."""
    pool = cupy.cuda.MemoryAsyncPool()
    cupy.cuda.set_allocator(pool.malloc)
    return pool


class GraphedStep:
    """``step()`` replayed from a CUDA graph after ``warmup`` plain calls; plain calls for good
    when the capture fails (``fallback_reason`` then holds why, ``graph`` stays None)."""

    def __init__(self, step, cupy, warmup: int = 2):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the kernels compile before a capture), "
                             f"got {warmup}")
        self.step, self.cupy, self.warmup = step, cupy, warmup
        self.graph, self.stream, self.fallback_reason, self.calls = None, None, None, 0

    def __call__(self):
        self.calls += 1
        if self.graph is not None:
            self.graph.launch(self.stream)
            return None
        if self.fallback_reason is not None or self.calls <= self.warmup:
            return self.step()
        stream = self.cupy.cuda.Stream(non_blocking=True)
        try:
            with stream:
                stream.begin_capture()
                try:
                    self.step()
                finally:              # a failed capture must still be ended, or the stream stays
                    graph = stream.end_capture()        # unusable
        except Exception as e:        # anything that stops a capture: fall back, say why
            self.fallback_reason = f"{type(e).__name__}: {e}"
            return self.step()
        self.graph, self.stream = graph, stream
        graph.launch(stream)          # capturing recorded the step without running it
        return None
