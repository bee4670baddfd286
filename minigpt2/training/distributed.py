"""The processes of a data-parallel run: how they talk, and what they decide together.

    mpiexec -n N python -m minigpt2 train ...        (docs/distributed.md)

Every process runs the same training; the arithmetic that makes them one run (their rows of
the batch, the gradient average, ZeRO-1) is ``data_parallel.py``. Here: the communicators that
carry it, and ``Processes``, what they do together besides: rank 0 alone checks the run folder,
prepares the data and writes, and its verdict (an error, or a result) reaches every process; a
signal to one process stops them all at the same step; an error they share is said once.

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

from ..backend import to_numpy

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
# what the processes do together


class Processes:
    """The processes of one run over a communicator ``comm`` (one process alone by default):
    rank 0 doing alone what must be done once, with its verdict on every process; a flag
    raised on one seen by all; the check that every process starts from the same weights.
    With one process each of these is the plain call."""

    def __init__(self, comm: Communicator | None = None):
        self.comm = comm if comm is not None else Communicator()

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def is_root(self) -> bool:
        return self.comm.rank == 0

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

    def gather(self, value) -> list:
        """[value of rank 0, value of rank 1, ...] on every process (small Python values)."""
        return self.comm.allgather_values(value)
