"""Data-parallel training: N processes, each with the whole model, each on its share of the batch.

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

Transports: MPI (mpi4py) between CPU processes; NCCL (``cupy.cuda.nccl``) between GPUs, one GPU
per process chosen by its rank on its machine, with the NCCL id sent over MPI, which also carries
the small control messages (verdicts, stop flags, random states). A process alone uses
``Communicator``, whose collectives return their input: the single-process run is the same code.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager

import numpy as np

from ..backend import array_module, to_numpy
from ..optim import AdamW, clip_grad_norm, global_norm

# Consecutive gradients are averaged together in flat buffers of about this size (PyTorch's
# DDP uses 25 MiB): large enough that a collective's latency is small beside its transfer.
BUCKET_BYTES = 25 << 20

# What MPI launchers set in each process they start: MPICH/Intel MPI (hydra), Open MPI, MVAPICH.
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")

INSTALL = "pip install mpi4py mpich (or pip install -e '.[distributed]')"


def _launched(variables) -> int | None:
    for name in variables:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def launched_size() -> int:
    """How many processes an MPI launcher (mpiexec, mpirun) started: 1 when there is none."""
    return _launched(_SIZE_VARIABLES) or 1


def launched_rank() -> int:
    """This process's rank as the MPI launcher numbered it: 0 when there is none."""
    return _launched(_RANK_VARIABLES) or 0


def on_every_process(error: BaseException) -> BaseException:
    """Mark an error that every process raises alike (a verdict of rank 0, a global loss that is
    not finite): only rank 0 then reports it (see ``one_report``)."""
    error.on_every_process = True
    return error


@contextmanager
def one_report():
    """Errors of the processes of one run, reported once: rank 0 raises its own; another rank
    exits with status 2 in silence when its error is one every process raised alike, and
    otherwise raises it with its rank in the message (it is that process's alone)."""
    try:
        yield
    except Exception as e:
        rank = launched_rank()
        if rank == 0:
            raise
        if getattr(e, "on_every_process", False):
            raise SystemExit(2) from None
        if e.args and isinstance(e.args[0], str):
            e.args = (f"process {rank}: {e.args[0]}",) + e.args[1:]
        raise


# ----------------------------------------------------------------------------------------------
# communicators: the transports


class Communicator:
    """One process alone: every collective returns its input unchanged.

    The MPI and NCCL communicators have the same methods. Array collectives work in place on
    arrays of the model's device; the others carry small Python values (verdicts, flags,
    hashes, random states) and always go over MPI."""

    rank, size, local_rank = 0, 1, 0
    name = "one process"

    def allreduce_sum(self, a):
        """a <- the element-wise sum of every process's ``a``."""
        return a

    def reduce_scatter_sum(self, a, out):
        """out (n/N,) <- this process's share (rank r: elements r*n/N ..) of the sum of every
        process's ``a`` (n,)."""
        out[...] = a
        return out

    def allgather(self, a):
        """a (n,): each process's share (as in ``reduce_scatter_sum``) copied to every process."""
        return a

    def bcast(self, value):
        """Rank 0's ``value``, on every process."""
        return value

    def allgather_values(self, value) -> list:
        """[value of rank 0, value of rank 1, ...] on every process."""
        return [value]

    def any(self, flag) -> bool:
        """True on every process when ``flag`` is true on one."""
        return bool(flag)

    def on_gpus(self) -> "Communicator":
        """The communicator for arrays on the GPU: itself for one process."""
        return self


class MPICommunicator(Communicator):
    """Processes joined by MPI (mpi4py): collectives on NumPy arrays and on Python values."""

    def __init__(self, comm):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)   # the processes on this machine
        self.local_rank = node.Get_rank()
        node.Free()
        self.name = "MPI (" + " ".join(MPI.Get_library_version().split("\n")[0].split()) + ")"

    def allreduce_sum(self, a):
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        return a

    def reduce_scatter_sum(self, a, out):
        self.comm.Reduce_scatter_block(a, out, op=self.MPI.SUM)
        return out

    def allgather(self, a):
        self.comm.Allgather(self.MPI.IN_PLACE, a)
        return a

    def bcast(self, value):
        return self.comm.bcast(value, root=0)

    def allgather_values(self, value) -> list:
        return self.comm.allgather(value)

    def any(self, flag) -> bool:
        return bool(self.comm.allreduce(int(bool(flag)), op=self.MPI.MAX))

    def on_gpus(self) -> "NCCLCommunicator":
        """The same processes over NCCL (made once: it picks this process's GPU)."""
        if getattr(self, "_nccl", None) is None:
            self._nccl = NCCLCommunicator(self.comm)
        return self._nccl


def _need_contiguous(*arrays):
    if not all(a.flags.c_contiguous for a in arrays):
        raise ValueError("NCCL collectives take C-contiguous arrays (NCCL reads a pointer and a "
                         "count): pass the flat buffer, not a view of it")


class NCCLCommunicator(MPICommunicator):
    """GPU processes: array collectives through NCCL on CuPy arrays, the rest over MPI.

    Each process takes the GPU numbered (its rank on this machine) modulo (the GPUs it sees), so
    ``mpiexec -n 8`` on an 8-GPU machine gives one GPU each. NCCL's collectives are queued on the
    current CUDA stream, in order with the CuPy work around them."""

    def __init__(self, comm):
        super().__init__(comm)
        import cupy
        try:
            from cupy.cuda import nccl
        except ImportError:
            nccl = None
        if nccl is None or not getattr(nccl, "available", True):
            raise RuntimeError("--device gpu on several processes needs NCCL, which CuPy does "
                               "not find: pip install nvidia-nccl-cu12 (CUDA 12) or "
                               "nvidia-nccl-cu13 (CUDA 13)")
        self.cupy, self.nccl = cupy, nccl
        self.device_id = self.local_rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(self.device_id).use()
        uid = self.bcast(nccl.get_unique_id() if self.rank == 0 else None)
        self.comm_nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.types = {np.dtype(np.float16): nccl.NCCL_FLOAT16,
                      np.dtype(np.float32): nccl.NCCL_FLOAT32,
                      np.dtype(np.float64): nccl.NCCL_FLOAT64}
        self.name = f"NCCL {nccl.get_version()} (GPU {self.device_id}), MPI for control"

    def on_gpus(self) -> "NCCLCommunicator":
        return self

    def _stream(self):
        return self.cupy.cuda.get_current_stream().ptr

    def allreduce_sum(self, a):
        """In place. NCCL reads a.size numbers from a.data.ptr as one contiguous run: a view
        that is not contiguous is summed in a contiguous copy, then copied back."""
        buf = a if a.flags.c_contiguous else self.cupy.ascontiguousarray(a)
        self.comm_nccl.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self.types[buf.dtype],
                                 self.nccl.NCCL_SUM, self._stream())
        if buf is not a:
            a[...] = buf
        return a

    def reduce_scatter_sum(self, a, out):
        _need_contiguous(a, out)
        self.comm_nccl.reduceScatter(a.data.ptr, out.data.ptr, out.size, self.types[a.dtype],
                                     self.nccl.NCCL_SUM, self._stream())
        return out

    def allgather(self, a):
        _need_contiguous(a)
        n = a.size // self.size
        mine = a[self.rank * n:]    # in place: the send buffer is this process's share of a
        self.comm_nccl.allGather(mine.data.ptr, a.data.ptr, n, self.types[a.dtype],
                                 self._stream())
        return a


_WORLD = None


def world() -> Communicator:
    """The communicator of all the processes an MPI launcher started (MPI on the CPU), or
    ``Communicator()`` when there is one process. The same object on every call."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    n = launched_size()
    if n <= 1:
        _WORLD = Communicator()
        return _WORLD
    try:
        from mpi4py import MPI
    except ImportError:
        raise on_every_process(RuntimeError(
            f"started by an MPI launcher as {n} processes, but mpi4py is not installed: "
            f"{INSTALL}")) from None
    if MPI.COMM_WORLD.Get_size() != n:
        raise on_every_process(RuntimeError(
            f"the launcher started {n} processes but MPI sees {MPI.COMM_WORLD.Get_size()}: its "
            "mpiexec belongs to another MPI library than mpi4py's; run the mpiexec installed "
            f"with it ({INSTALL} puts one in this environment)"))
    _WORLD = MPICommunicator(MPI.COMM_WORLD)
    return _WORLD


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
    process's rows of the global batch, the averages of gradients and losses, the global
    gradient norm, the optimizer (AdamW, or with ``zero=1`` the sharded ``ZeroAdamW``), and
    rank 0 doing alone what must be done once. With one process each of these is the
    single-process operation itself.

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
        self.buckets = None
        self._shard_grads = None    # ZeRO-1: the gradient pieces of this process's shares

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def is_root(self) -> bool:
        return self.comm.rank == 0

    def __repr__(self):
        zero = ", ZeRO-1" if self.zero and self.size > 1 else ""
        return f"{self.size} processes over {self.comm.name}{zero}"

    # --- the batch --------------------------------------------------------------------------

    def rows(self, batch_size: int) -> slice | None:
        """This process's rows of a global batch of N * batch_size (None: one process, all)."""
        if self.size == 1:
            return None
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)

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

    # --- what rank 0 does alone ------------------------------------------------------------

    def _verdict(self, error):
        """Rank 0's error (or None) sent to every process and raised there."""
        sent = None if error is None else \
            (type(error) if type(error).__module__ == "builtins" else RuntimeError, str(error))
        sent = self.comm.bcast(sent)
        if error is not None:
            raise error
        if sent is not None:
            raise on_every_process(sent[0](sent[1]))

    def _root_verdict(self, fn, args):
        """``fn(*args)`` on rank 0 alone; its error, if any, raised on every process."""
        result, error = None, None
        if self.is_root:
            try:
                result = fn(*args)
            except Exception as e:   # noqa: BLE001 - every process raises it
                error = e
        self._verdict(error)
        return result

    def on_root(self, fn, *args):
        """``fn(*args)`` on rank 0 alone (checking the run folder: once rank 0 has written there,
        another look would refuse it); its result, or its error, on every process."""
        return self.comm.bcast(self._root_verdict(fn, args))

    def root_first(self, fn, *args):
        """``fn(*args)`` on rank 0, then, once it succeeded, on the others (preparing the data:
        rank 0 writes the token files, the others find them ready)."""
        result = self._root_verdict(fn, args)
        return result if self.is_root else fn(*args)

    def any(self, flag) -> bool:
        """True on every process when ``flag`` is true on one (a Ctrl-C or SIGTERM that reached
        one process stops them all at the same step)."""
        return self.comm.any(flag)

    def check_same_weights(self, params: dict) -> None:
        """Refuse to start when the processes' weights differ: each hashes its own (SHA-256 of
        every array in order) and the hashes are compared."""
        if self.size == 1:
            return
        h = hashlib.sha256()
        for name, p in params.items():
            h.update(name.encode() + np.ascontiguousarray(to_numpy(p)).tobytes())
        digests = self.comm.allgather_values(h.hexdigest())
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise on_every_process(RuntimeError(
                f"the initial weights of process {differ[0]} differ from those of process 0 "
                f"({len(differ)} of {self.size} processes differ): every process must build the "
                "model from the same --seed, --init-from or checkpoint files"))

    def seed_dropout(self, model, seed: int) -> None:
        """Give process r > 0 a dropout stream of its own (rank 0 keeps the model's, so one
        process is the single-process run); equal streams would drop the same units in every
        process's rows."""
        if self.rank > 0:
            entropy = np.random.SeedSequence([seed, 3, self.rank]).generate_state(1)[0]
            model.dropout_rng = model.xp.random.default_rng(int(entropy))


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
