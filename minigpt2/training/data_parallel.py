"""Data-parallel training, the arithmetic: N processes, each with the whole model, each on its
share of the batch (the processes and their transports: ``distributed.py``).

    mpiexec -n N python -m minigpt2 train ...        (docs/distributed.md)

One optimizer step on N processes with a per-process batch B:
  1. every process draws the same N*B windows (they share the data generator's seed) and keeps
     its own B rows, rank r the rows r*B .. r*B + B - 1: together they see the batch one
     process with batch N*B would;
  2. each runs the forward and backward on its rows (gradient accumulation sums locally);
  3. the gradients are averaged over the processes. Each process's loss is a mean over the same
     number of positions, so (1/N) sum_r g_r is the gradient of the mean loss over all N*B rows;
  4. every process applies that same update to the same weights: they stay equal.

Step 3 is an all-reduce over flat buckets of gradients: a few large collectives instead of one
per tensor, and an extra buffer of one bucket instead of a second copy of every gradient.

ZeRO stage 1 (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", 2020), ``--zero 1``: AdamW's two moments take twice the memory of the weights,
and plain data parallelism keeps a copy on every process. Instead each bucket is reduce-
scattered: process r receives the average of only its 1/N of the bucket, updates that share of
the weights with its 1/N of the moments, and an all-gather hands the updated weights to all.
AdamW is element-wise, so every weight gets the update it would get without sharding.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, to_numpy
from ..fast.optim import AdamW
from ..optim import clip_grad_norm, global_norm
from .distributed import Communicator

# Consecutive gradients are averaged together in flat buffers of about this size (PyTorch's
# DDP uses 25 MiB): large enough that a collective's latency is small beside its transfer.
BUCKET_BYTES = 25 << 20


# ----------------------------------------------------------------------------------------------
# buckets: the flat layout of the parameters


class _Bucket:
    """Consecutive parameters laid end to end in one flat vector, padded to a multiple of N.

    ``spans``: (name, start, stop) of each parameter in the vector; process r owns the
    elements r*share .. (r+1)*share - 1 (its share under ZeRO-1)."""

    def __init__(self, spans, size, n):
        self.spans = spans
        self.size = -(-size // n) * n
        self.share = self.size // n


def _plan_buckets(params: dict, n: int, bucket_bytes: int) -> list[_Bucket]:
    buckets, spans, size, limit = [], [], 0, None
    for name, p in params.items():
        limit = max(1, bucket_bytes // p.itemsize)
        if spans and size + p.size > limit:
            buckets.append(_Bucket(spans, size, n))
            spans, size = [], 0
        spans.append((name, size, size + p.size))
        size += p.size
    if spans:
        buckets.append(_Bucket(spans, size, n))
    return buckets


# ----------------------------------------------------------------------------------------------
# data parallelism over a communicator


class DataParallel:
    """What data parallelism adds to a training step, over a communicator ``comm``: this
    process's rows of the global batch and dropout stream, the averages of gradients and
    losses, the global gradient norm, and the optimizer (AdamW, or with ``zero=1`` the sharded
    ``ZeroAdamW``). With one process each of these is the single-process operation itself.
    (What the processes decide together, rank 0's verdicts and stopping at one step, is
    ``distributed.Processes``.)

    ``device="gpu"`` with several processes moves the gradients over NCCL (and chooses this
    process's GPU, so build it before the model)."""

    def __init__(self, comm: Communicator | None = None, device: str = "cpu", zero: int = 0,
                 bucket_bytes: int = BUCKET_BYTES):
        if zero not in (0, 1):
            raise ValueError(f"--zero must be 0 (off) or 1 (shard AdamW's moments), got {zero!r}")
        comm = comm if comm is not None else Communicator()
        if device == "gpu":
            comm = comm.on_gpus()
        self.comm, self.zero, self.bucket_bytes = comm, zero, bucket_bytes
        self.rank, self.size = comm.rank, comm.size
        self.buckets = None
        self._shard_grads = None    # ZeRO-1: the gradient pieces of this process's shares

    def __repr__(self):
        zero = ", ZeRO-1" if self.zero and self.size > 1 else ""
        return f"{self.size} processes over {self.comm.name}{zero}"

    # --- this process's share: its rows, its dropout ----------------------------------------

    def rows(self, batch_size: int) -> slice | None:
        """This process's rows of a global batch of N * batch_size (None: one process, all)."""
        if self.size == 1:
            return None
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)

    def seed_dropout(self, model, seed: int) -> None:
        """Give process r > 0 a dropout stream of its own (rank 0 keeps the model's, so one
        process is the single-process run); equal streams would drop the same units in every
        process's rows."""
        if self.rank > 0:
            entropy = np.random.SeedSequence([seed, 3, self.rank]).generate_state(1)[0]
            model.dropout_rng = model.xp.random.default_rng(int(entropy))

    # --- averages ---------------------------------------------------------------------------

    def mean(self, value):
        """The mean over the processes of a number (a float, or a 0-d array on the device:
        the loss); ``value`` itself for one process."""
        if self.size == 1:
            return value
        xp = array_module(value)
        buf = xp.asarray(value, dtype=np.float64).reshape(1).copy()
        self.comm.allreduce_sum(buf)
        mean = buf[0] * (1.0 / self.size)
        return float(mean) if isinstance(value, float) else mean

    def average_gradients(self, grads: dict) -> dict:
        """The gradients averaged over the processes.

        Without ZeRO: the all-reduced mean written back into ``grads`` (returned), bucket by
        bucket; a gradient that fills a bucket alone is reduced in place, without a copy.
        With ZeRO-1: a reduce-scatter per bucket; returns this process's share only, a dict of
        pieces (views of ``name[start:stop]``) with the keys of ``ZeroAdamW``'s moments.
        The buckets are reduced once the backward is done: starting each while the backward
        continues would need the backward to hand out every block's gradients as it finishes
        them (docs/distributed.md weighs what that could gain).
        """
        if self.size == 1:
            return grads
        if self.buckets is None:
            self.buckets = _plan_buckets(grads, self.size, self.bucket_bytes)
        g0 = next(iter(grads.values()))
        xp, scale = array_module(g0), 1.0 / self.size
        if self.zero:
            if self._shard_grads is None:
                raise RuntimeError("ZeRO-1 averages into the shares of its optimizer: build it "
                                   "with DataParallel.optimizer(params) first")
            send = xp.zeros(max(b.size for b in self.buckets), dtype=g0.dtype)
            for b in self.buckets:
                for name, start, stop in b.spans:
                    send[start:stop] = grads[name].reshape(-1)
                send[b.spans[-1][2]:b.size] = 0          # the padding stays out of the sums
                self.comm.reduce_scatter_sum(send[:b.size], b.grad_share)
                b.grad_share *= scale
            return self._shard_grads
        flat = None
        for b in self.buckets:
            if len(b.spans) == 1 and b.size == grads[b.spans[0][0]].size:
                g = grads[b.spans[0][0]]
                self.comm.allreduce_sum(g.reshape(-1))
                g *= scale
                continue
            if flat is None:
                flat = xp.empty(max(bb.size for bb in self.buckets), dtype=g0.dtype)
            buf = flat[:b.size]
            buf[b.spans[-1][2]:] = 0
            for name, start, stop in b.spans:
                buf[start:stop] = grads[name].reshape(-1)
            self.comm.allreduce_sum(buf)
            buf *= scale
            for name, start, stop in b.spans:
                grads[name][...] = buf[start:stop].reshape(grads[name].shape)
        return grads

    def global_norm(self, grads: dict):
        """The L2 norm of the whole averaged gradient (0-d array): with ZeRO-1 every process
        holds a share, so the sums of squares of the shares are added over the processes."""
        if not (self.zero and self.size > 1):
            return global_norm(grads)
        g0 = next(iter(grads.values()))
        xp = array_module(g0)
        buf = xp.zeros(1, dtype=g0.dtype)
        for g in grads.values():
            buf += (g * g).sum()
        self.comm.allreduce_sum(buf)
        return xp.sqrt(buf[0])

    def clip_grad_norm(self, grads: dict, max_norm: float):
        """``optim.clip_grad_norm`` with the norm of the whole gradient (``global_norm``)."""
        if not (self.zero and self.size > 1):
            return clip_grad_norm(grads, max_norm)
        return clip_grad_norm(grads, max_norm, total=self.global_norm(grads))

    # --- the optimizer ----------------------------------------------------------------------

    def optimizer(self, params: dict, **adamw):
        """AdamW over ``params`` (keyword arguments as AdamW's); with ``zero=1`` and several
        processes a ``ZeroAdamW``, which lays the parameters out in the buckets' flat vectors
        (``params``' entries become views of them)."""
        if not (self.zero and self.size > 1):
            return AdamW(params, **adamw)
        return ZeroAdamW(params, self, **adamw)


class ZeroAdamW:
    """AdamW with its moments sharded over the processes: ZeRO stage 1.

    The parameters live in the buckets' flat vectors (``params``' entries are views of them).
    Process r holds the moments of its share of each bucket only, an ``AdamW`` over the pieces
    of parameters that fall in its shares (a piece of a matrix keeps two dimensions, shape
    (1, n), so it is weight-decayed as the matrix is). ``step(shard_grads)`` updates those
    pieces, then an all-gather of each bucket brings every process the whole updated weights.

    The training loop and checkpoints use it as an AdamW: ``lr``, ``t``, ``betas``, ``eps``,
    ``weight_decay``, ``params``; ``state_dict()`` gathers the whole moments (every process
    must call it), ``load_state_dict`` takes whole moments and keeps this process's share, so
    a checkpoint resumes on any number of processes, with or without ZeRO."""

    def __init__(self, params: dict, dp: DataParallel, **adamw):
        self.params, self.dp = params, dp
        dp.buckets = _plan_buckets(params, dp.size, dp.bucket_bytes)
        p0 = next(iter(params.values()))
        xp = array_module(p0)
        weights, grads, self.pieces = {}, {}, []
        for b in dp.buckets:
            b.weights = xp.zeros(b.size, dtype=p0.dtype)
            b.grad_share = xp.zeros(b.share, dtype=p0.dtype)
            lo, hi = dp.rank * b.share, (dp.rank + 1) * b.share
            for name, start, stop in b.spans:
                p = params[name]
                b.weights[start:stop] = p.reshape(-1)
                params[name] = b.weights[start:stop].reshape(p.shape)
                a, z = max(start, lo), min(stop, hi)     # this process's part of the parameter
                if a >= z:
                    continue
                key = f"{name}[{a - start}:{z - start}]"
                shape = (1, z - a) if p.ndim >= 2 else (z - a,)
                weights[key] = b.weights[a:z].reshape(shape)
                grads[key] = b.grad_share[a - lo:z - lo].reshape(shape)
                self.pieces.append((key, name, a - start, z - start, shape, b, a))
        dp._shard_grads = grads
        self.shard = AdamW(weights, **adamw)

    # the settings live in the AdamW of the shard
    lr = property(lambda self: self.shard.lr, lambda self, v: setattr(self.shard, "lr", v))
    t = property(lambda self: self.shard.t)
    betas = property(lambda self: self.shard.betas)
    eps = property(lambda self: self.shard.eps)
    weight_decay = property(lambda self: self.shard.weight_decay)

    def step(self, grads: dict) -> None:
        """Update this process's pieces from ``grads`` (``DataParallel.average_gradients``'
        share), then all-gather every bucket: the whole weights, updated, on every process."""
        self.shard.step(grads)
        for b in self.dp.buckets:
            self.dp.comm.allgather(b.weights)

    def state_dict(self) -> dict:
        """AdamW's state_dict with the whole moments (gathered from every process's share)."""
        xp = array_module(next(iter(self.params.values())))
        state = {"t": self.t, "lr": self.lr, "betas": self.betas, "eps": self.eps,
                 "weight_decay": self.weight_decay}
        for key in ("m", "v"):
            moments, whole = getattr(self.shard, key), {}
            for b in self.dp.buckets:
                flat = xp.zeros(b.size, dtype=b.weights.dtype)
                for piece, _, _, _, _, pb, a in self.pieces:
                    if pb is b:
                        flat[a:a + moments[piece].size] = moments[piece].reshape(-1)
                self.dp.comm.allgather(flat)
                for name, start, stop in b.spans:
                    whole[name] = flat[start:stop].reshape(self.params[name].shape).copy()
            state[key] = whole
        return state

    def load_state_dict(self, state: dict) -> None:
        """Take AdamW's whole state (``state_dict()`` of an AdamW or a ZeroAdamW) and keep this
        process's share of the moments."""
        shard = {k: state[k] for k in ("t", "lr", "betas", "eps", "weight_decay")}
        for key in ("m", "v"):
            if set(state[key]) != set(self.params):
                raise ValueError(f"optimizer state '{key}' does not match the model's parameters")
            shard[key] = {piece: np.asarray(to_numpy(state[key][name])).reshape(-1)[a:z]
                          .reshape(shape) for piece, name, a, z, shape, _, _ in self.pieces}
        self.shard.load_state_dict(shard)
