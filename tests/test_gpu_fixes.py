"""Fixes to the GPU path found by reading it, each tested on the CPU: dropout in float16, the
phase timer wrapping once, the default attention following the last measurement, NCCL's
all-reduce of a view that is not contiguous."""

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from emulated_cupy import emulated
from minigpt2 import GPT, GPTConfig
from minigpt2.bench import train_gpu
from minigpt2.training.distributed import NCCLCommunicator


def test_float16_dropout_on_the_cpu():
    """Generator.random refuses float16: the mask is drawn in float32 and cast."""
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, dropout=0.1)
    model = GPT(cfg, seed=0, precision="float16")
    idx = np.random.default_rng(0).integers(0, 20, (2, 8))
    _, loss = model.forward(idx, idx)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(g).all() for g in model.backward().values())


class _Event:
    def record(self):
        pass


FAKE_CUPY = SimpleNamespace(cuda=SimpleNamespace(Event=_Event))


def test_phase_timer_wraps_a_function_once():
    """Two profiles in one process (two precisions) time each call once, into the live timer."""
    layer_set = SimpleNamespace(layernorm_forward=lambda x: x + 1)
    first, second = train_gpu.PhaseTimer(FAKE_CUPY), train_gpu.PhaseTimer(FAKE_CUPY)
    first.wrap(layer_set, "layernorm_forward", "element-wise")
    second.wrap(layer_set, "layernorm_forward", "element-wise")
    assert layer_set.layernorm_forward(1) == 2
    assert len(second.pending) == 1 and first.pending == []


def test_faster_attention_reads_the_bench_pair():
    def rows(*medians):
        return [{"framework": "minigpt2", "times": [m, m * 2, m]} for m in medians] + \
               [{"framework": "sdpa", "times": [0.001] * 3}]
    assert train_gpu.faster_attention(rows(0.20), rows(0.25)) == "flash"
    assert train_gpu.faster_attention(rows(0.30), rows(0.25)) == "stored"
    with pytest.raises(ValueError, match="stored"):
        train_gpu.faster_attention(rows(0.2), [])


def test_the_default_attention_is_the_measured_faster_one():
    """Until a GPU measures the pair, the stored cuBLAS attention; after, the faster."""
    with emulated() as e:
        assert e.gpu_layers.MEASURED_FASTER in (None, "flash", "stored")
        assert e.gpu_layers.GPU_FLASH == (e.gpu_layers.MEASURED_FASTER == "flash")


class _DeviceArray(np.ndarray):
    """A NumPy array with CuPy's ``data.ptr``."""

    @property
    def data(self):
        return SimpleNamespace(ptr=self.__array_interface__["data"][0])


class _TwoRankNccl:
    """allReduce over two ranks holding the same numbers: doubles ``count`` contiguous float64s
    at the pointer, as NCCL reads them."""

    def allReduce(self, send, recv, count, dtype, op, stream):
        assert send == recv
        np.ctypeslib.as_array((ctypes.c_double * count).from_address(recv))[...] *= 2


def test_nccl_allreduce_of_a_view_that_is_not_contiguous():
    comm = NCCLCommunicator.__new__(NCCLCommunicator)     # no NCCL here: its collective faked
    comm.cupy = SimpleNamespace(ascontiguousarray=lambda a: np.ascontiguousarray(a).view(_DeviceArray),
                                cuda=SimpleNamespace(get_current_stream=lambda: SimpleNamespace(ptr=0)))
    comm.nccl, comm.comm_nccl = SimpleNamespace(NCCL_SUM=0), _TwoRankNccl()
    comm.types = {np.dtype(np.float64): 0}
    base = np.arange(12.0).reshape(3, 4).view(_DeviceArray)
    view = base[:, ::2]                                   # every other column
    comm.allreduce_sum(view)
    want = np.arange(12.0).reshape(3, 4)
    want[:, ::2] *= 2
    assert (np.asarray(base) == want).all()
    with pytest.raises(ValueError, match="contiguous"):
        comm.allgather(view)
