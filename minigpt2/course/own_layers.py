"""Your layers in the model: the functions written in notebooks 02-05, as a layer set for ``GPT``.

The exercises of notebooks 02-05 ask for the layers one by one (the embedding, LayerNorm,
attention, the linear and GELU backward, cross-entropy). ``own_layer_set(folder)`` reads the
exercise cells of those notebooks in ``folder`` (the learner copies in notebooks/exercises/, or
the worked notebooks), runs them, and returns a layer set: the reference ``layers`` module's
functions, with each of yours in place of its counterpart, called the way the model calls them.
Swapped into a model,

    model = GPT(cfg, layers="reference")
    model.layers = own_layer_set(folder)

every forward and backward of training runs your code. A function still a stub (it raises
NotImplementedError) is left to the reference, and ``own_layer_set(...).yours`` names what is yours.
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import nbformat
import numpy as np

from .. import layers

NOTEBOOKS = ("02_embeddings_layernorm", "03_causal_self_attention", "04_mlp_gelu_preln_block",
             "05_whole_gpt2")
# the exercise functions the model calls, in the model's own names
USED = ("embedding_forward", "embedding_backward", "layernorm_forward", "layernorm_backward",
        "attention_forward", "attention_backward", "linear_backward", "gelu_backward",
        "cross_entropy_forward", "cross_entropy_backward")


def exercise_functions(folder) -> dict:
    """The functions the exercise cells of notebooks 02-05 in ``folder`` define (the cells that
    import a grader from ``minigpt2.course.exercises``), by name. They run in one namespace that
    starts with ``np``, ``math`` and ``layers``, as the notebooks' own first cells import them."""
    namespace = {"np": np, "math": math, "layers": layers}
    for stem in NOTEBOOKS:
        path = Path(folder) / f"{stem}.ipynb"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: notebook {stem[:2]} is not there; pass the folder "
                                    "that holds notebooks 02-05 (notebooks/exercises for your "
                                    "copies, notebooks for the worked ones)")
        nb = nbformat.read(path, as_version=4)
        for k, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and "from minigpt2.course.exercises import" in cell.source:
                exec(compile(cell.source, f"{path.name}, cell {k}", "exec"), namespace)
    return {name: namespace[name] for name in USED if callable(namespace.get(name))}


def _is_stub(fn) -> bool:
    return "NotImplementedError" in fn.__code__.co_names


def own_layer_set(folder):
    """A layer set for ``GPT.layers``: ``layers``' functions, yours in place of theirs where you
    wrote one. Your ``attention_forward(qkv, n_head)`` has no dropout: train with dropout 0."""
    found = {name: fn for name, fn in exercise_functions(folder).items() if not _is_stub(fn)}
    own = dict(found)
    if "embedding_backward" in found:        # the model adds the tied head's share of dwte
        def embedding_backward(dx, cache, dwte=None):
            dwte_emb, dwpe = found["embedding_backward"](dx, cache)
            return (dwte_emb if dwte is None else dwte + dwte_emb), dwpe
        own["embedding_backward"] = embedding_backward
    if "attention_forward" in found:         # the model passes its dropout settings
        def attention_forward(qkv, n_head, dropout_p=0.0, rng=None):
            if dropout_p > 0.0 and rng is not None:
                raise ValueError("your attention_forward has no dropout: build the model with "
                                 "dropout=0.0")
            return found["attention_forward"](qkv, n_head)
        own["attention_forward"] = attention_forward
    pairs = (("embedding_forward", "embedding_backward"), ("layernorm_forward", "layernorm_backward"),
             ("attention_forward", "attention_backward"),
             ("cross_entropy_forward", "cross_entropy_backward"))
    for fwd, bwd in pairs:   # a forward's cache only fits its own backward: both or neither
        if (fwd in own) != (bwd in own):
            own.pop(fwd, None), own.pop(bwd, None)
    reference = {name: getattr(layers, name) for name in dir(layers) if not name.startswith("_")}
    layer_set = types.SimpleNamespace(**{**reference, **own})
    layer_set.yours = sorted(own)
    return layer_set
