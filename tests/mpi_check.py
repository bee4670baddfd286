"""Run under ``mpiexec -n N python tests/mpi_check.py [cpu|gpu]`` by tests/test_distributed.py.

Checks DataParallel's collectives on gradients of odd sizes against the mean computed directly
(every process can rebuild every other's gradients from their seeds): buckets of one small
tensor, of several, of one tensor alone (reduced in place), ZeRO-1's shares with padding, a
ZeroAdamW step against AdamW on the whole mean, its gathered state, and the weight-hash check
with one process's weights changed. Rank 0 prints "ok 0 ok 1 ..." (one entry per process that
finished) on success; fails with an assertion.
"""

import sys

import numpy as np

from minigpt2.training import distributed
from minigpt2.training.data_parallel import DataParallel
from minigpt2.backend import to_numpy
from minigpt2.optim import AdamW

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
comm = distributed.world()
rank, n = comm.rank, comm.size
SHAPES = {"a.weight": (7, 5), "b.bias": (3,), "c.weight": (11, 13), "d.bias": (1,),
          "e.weight": (4, 9)}


def grads_of(r, xp):
    rng = np.random.default_rng([42, r])
    return {k: xp.asarray(rng.standard_normal(s)) for k, s in SHAPES.items()}


def rel(a, b):
    a, b = to_numpy(a), to_numpy(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


for zero in (0, 1):
    for bucket_bytes in (8, 200, 1 << 20):  # a tensor per bucket; a few per bucket; one bucket
        dp = DataParallel(comm, device, zero, bucket_bytes=bucket_bytes)
        xp = np if device == "cpu" else __import__("cupy")
        expected = {k: sum(grads_of(r, np)[k] for r in range(n)) / n for k in SHAPES}
        params = {k: xp.asarray(np.random.default_rng(7).standard_normal(s))
                  for k, s in SHAPES.items()}
        reference = {k: to_numpy(v).copy() for k, v in params.items()}
        opt = dp.optimizer(params, lr=1e-2, weight_decay=0.1)
        reduced = dp.average_gradients(grads_of(rank, xp))
        if not zero:
            for k in SHAPES:
                assert rel(reduced[k], expected[k]) < 1e-15, (zero, bucket_bytes, k)
        else:   # each piece is its slice of the mean
            for key, name, a, z, shape, _, _ in opt.pieces:
                want = expected[name].reshape(-1)[a:z]
                assert rel(reduced[key].reshape(-1), want) < 1e-15, (bucket_bytes, key)
            covered = comm.allgather_values(sum(z - a for _, _, a, z, _, _, _ in opt.pieces))
            assert sum(covered) == sum(int(np.prod(s)) for s in SHAPES.values())
        norm = float(dp.global_norm(reduced))
        want_norm = float(np.sqrt(sum((g * g).sum() for g in expected.values())))
        assert abs(norm - want_norm) <= 1e-12 * want_norm, (norm, want_norm)
        # one optimizer step: the same weights as AdamW on the whole mean, on every process
        opt.step(reduced)
        ref_opt = AdamW(reference, lr=1e-2, weight_decay=0.1)
        ref_opt.step({k: v.copy() for k, v in expected.items()})
        for k in SHAPES:
            assert rel(params[k], reference[k]) < 1e-15, (zero, bucket_bytes, k)
        state = opt.state_dict()
        for key in ("m", "v"):
            for k in SHAPES:
                assert rel(state[key][k], getattr(ref_opt, key)[k]) < 1e-15, (key, k)
        # a state loaded back gives the same next step as the reference's
        opt.load_state_dict(ref_opt.state_dict())
        assert opt.t == ref_opt.t == 1

# the weight check: equal weights pass; one process's change is caught on every process
procs = distributed.Processes(comm)
weights = {k: np.random.default_rng(7).standard_normal(s) for k, s in SHAPES.items()}
procs.check_same_weights(weights)
if rank == n - 1:
    weights["b.bias"][0] += 1e-12
try:
    procs.check_same_weights(weights)
except RuntimeError as e:
    assert f"process {n - 1} differ" in str(e) and e.on_every_process, e
else:
    raise AssertionError("differing weights were not detected")
# one line from rank 0 for all (the processes' own prints may interleave in mpiexec's output)
done = comm.allgather_values(rank)
if rank == 0:
    print(" ".join(f"ok {r}" for r in done), flush=True)
