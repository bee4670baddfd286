"""The fast layer sets: the same functions as ``minigpt2/layers.py``, made fast, tested equal.

``cpu_layers`` and ``cpu_attention``: NumPy in place and in cache-sized blocks (the tiled,
FlashAttention form for long sequences); ``gpu_layers``: CuPy with the fused CUDA kernels of
``kernels`` and the FlashAttention kernels of ``flash_kernels`` (their shared CUDA C in
``cuda_source``); ``optim``: the AdamW update block by block (CPU) or in one kernel (GPU).
How a model picks its set: docs/architecture.md, "Readable and fast paths".

A set provides the functions named in ``layers.LAYER_SET``. A fast module is a set itself; its
mixed-precision set (``FLOAT16``) is built by ``layer_set`` from the module's functions, with the
float16 forms in place of some.
"""

from __future__ import annotations

from types import SimpleNamespace

from ..layers import LAYER_SET


def layer_set(functions: dict, **replaced) -> SimpleNamespace:
    """The layer set with ``replaced``'s functions and, for every other name of ``LAYER_SET``,
    the one in ``functions`` (a module's ``globals()``). A name outside the contract, or one
    neither gives, is a TypeError: a set is the whole contract and nothing else."""
    unknown = sorted(set(replaced) - set(LAYER_SET))
    missing = [name for name in LAYER_SET if name not in replaced and name not in functions]
    if unknown or missing:
        raise TypeError(f"a layer set provides exactly layers.LAYER_SET: unknown {unknown}, "
                        f"missing {missing}")
    return SimpleNamespace(**{name: replaced[name] if name in replaced else functions[name]
                              for name in LAYER_SET})
