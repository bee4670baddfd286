"""The GPT-2 model: parameters, the pre-LN block, forward, backward and generation.

Shapes: B batch, T time, C channels, V vocabulary, H heads, hs = C / H, L layers.

GPT-2 (§2.3 of the paper) is GPT-1's decoder with LayerNorm moved to the input of each sub-block
("pre-LN"), one more LayerNorm after the last block, and residual weights scaled at init:

    x = wte[idx] + wpe[t]
    for each of the L blocks:
        x = x + c_proj(attention(c_attn(ln_1(x))))
        x = x + c_proj(gelu(c_fc(ln_2(x))))
    logits = ln_f(x) @ wte^T                   (the LM head shares wte: "weight tying")
"""

from __future__ import annotations

import math

import numpy as np

from .fast import cpu_layers as cpu_layers
from . import layers
from .backend import array_module, get_xp, resolve_device, resolve_dtype
from .config import (BLOCK_PARAMS, LAYER_NORM_EPS, GPTConfig, check_finite, check_params,
                     param_shapes)
from .io.inputs import forward_ids, generation_vocab, padded_vocab_size, token_ids

# How a forward and backward compute (the weights in model.params keep the model's dtype):
#   "float32"  float32 everywhere; on the GPU, matrix multiplies in full float32 (no TF32)
#   "tf32"     the same, with the GPU's matrix multiplies on TF32 tensor cores (GPU only)
#   "float16"  mixed precision: float16 copies of the float32 weights, float16 activations and
#              matrix multiplies (on the GPU, TF32 for those CuPy computes in float32); LayerNorm,
#              softmax and the loss computed in float32; the loss scaled by ``loss_scale`` for the
#              backward and the gradients returned in float32, unscaled (an overflow shows as
#              non-finite gradients: see optim.LossScaler)
# TF32 is a process-wide cuBLAS mode (``gpu_layers.set_tf32``): a GPU model sets it when its
# precision is set (when built, or changed), so of several GPU models in one process the one
# whose precision was set last decides it for all.
PRECISIONS = ("float32", "tf32", "float16")

# Which functions compute the layers, all with the same outputs and gradients ("fast":
# fast/cpu_layers.py or fast/gpu_layers.py by device; "reference": layers.py, float32 or float64
# only); the story is told once in docs/architecture.md, "Readable and fast paths".
LAYER_SETS = ("fast", "reference")

def init_params(cfg: GPTConfig, seed: int, dtype) -> dict:
    """GPT-2's initialisation, drawn on the host so a seed gives the same weights on CPU and GPU.

    Weights ~ N(0, 0.02); biases 0; LayerNorm weight 1, bias 0. The two projections that write
    into the residual stream (attn.c_proj, mlp.c_proj) are scaled by 1/sqrt(N), N = 2 * n_layer
    residual layers (§2.3), so the stream's variance does not grow with depth.
    Values are drawn in float32 whatever the dtype, so float32 and float64 models of one seed
    start from the same numbers.
    """
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p = np.ones(shape, dtype=np.float32)
        elif name.endswith(".bias"):
            p = np.zeros(shape, dtype=np.float32)
        else:
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            p = rng.standard_normal(shape, dtype=np.float32)
            p *= np.float32(std)
        params[name] = p.astype(dtype, copy=False)
    return params


# ----------------------------------------------------------------------------------------------
# the pre-LN transformer block


def block_forward(x, p, n_head, dropout_p=0.0, rng=None, *, layer_set=layers, attention=None):
    """One GPT-2 block. x (B, T, C) -> (B, T, C). ``p`` maps the block's parameter names
    ("ln_1.weight", "attn.c_attn.weight", ...) to arrays. Dropout as in GPT-2's training code
    (after the attention softmax and after each residual projection) when dropout_p > 0.

    ``layer_set`` holds the layer functions (``layers``, ``cpu_layers``, ``gpu_layers``: the same
    names). ``attention`` maps qkv (B, T, 3C) to (y (B, T, C), cache); by default the set's
    ``attention_forward`` over the T positions; generation passes one that attends to its
    KV cache as well."""
    F = layer_set
    # x = x + attn(ln_1(x))
    a, ln_1 = F.layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"], LAYER_NORM_EPS)
    qkv, c_attn = F.linear_forward(a, p["attn.c_attn.weight"], p["attn.c_attn.bias"])  # (B, T, 3C)
    if attention is None:
        y, attn = F.attention_forward(qkv, n_head, dropout_p, rng)                      # (B, T, C)
    else:
        y, attn = attention(qkv)
    y, attn_proj = F.linear_forward(y, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
    y, drop_1 = F.dropout_forward(y, dropout_p, rng)
    x = x + y
    # x = x + mlp(ln_2(x))
    m, ln_2 = F.layernorm_forward(x, p["ln_2.weight"], p["ln_2.bias"], LAYER_NORM_EPS)
    m, c_fc = F.linear_forward(m, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])             # (B, T, 4C)
    m, gelu = F.gelu_forward(m)
    m, mlp_proj = F.linear_forward(m, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])     # (B, T, C)
    m, drop_2 = F.dropout_forward(m, dropout_p, rng)
    x = x + m
    return x, (F, ln_1, c_attn, attn, attn_proj, drop_1, ln_2, c_fc, gelu, mlp_proj, drop_2)


def block_backward(dx, cache):
    """Backward of ``block_forward`` (with the layer set it used, kept in the cache).
    dx (B, T, C) -> (dx (B, T, C), dict of parameter grads).

    Each residual ``x = x + f(x)`` passes dx straight through and adds f's input gradient.
    """
    F, ln_1, c_attn, attn, attn_proj, drop_1, ln_2, c_fc, gelu, mlp_proj, drop_2 = cache
    g = {}
    # x = x + mlp(ln_2(x))
    dm = F.dropout_backward(dx, drop_2)
    dm, g["mlp.c_proj.weight"], g["mlp.c_proj.bias"] = F.linear_backward(dm, mlp_proj)
    dm = F.gelu_backward(dm, gelu)
    dm, g["mlp.c_fc.weight"], g["mlp.c_fc.bias"] = F.linear_backward(dm, c_fc)
    dm, g["ln_2.weight"], g["ln_2.bias"] = F.layernorm_backward(dm, ln_2)
    dx = dx + dm
    # x = x + attn(ln_1(x))
    dy = F.dropout_backward(dx, drop_1)
    dy, g["attn.c_proj.weight"], g["attn.c_proj.bias"] = F.linear_backward(dy, attn_proj)
    dqkv = F.attention_backward(dy, attn)
    da, g["attn.c_attn.weight"], g["attn.c_attn.bias"] = F.linear_backward(dqkv, c_attn)
    da, g["ln_1.weight"], g["ln_1.bias"] = F.layernorm_backward(da, ln_1)
    return dx + da, g


# ----------------------------------------------------------------------------------------------
# sampling rules (openai/gpt-2 src/sample.py)


def top_k_logits(logits, k):
    """Keep the k largest logits of each row (ties at the k-th value kept), others -> -1e10.

    logits (B, V). k = 0 or None: unchanged."""
    if not k:
        return logits
    xp = array_module(logits)
    kth = xp.sort(logits, axis=-1)[:, -k][:, None]                        # (B, 1)
    return xp.where(logits < kth, -1e10, logits)


def top_p_logits(logits, p):
    """Nucleus filtering as openai/gpt-2 does it: sort descending, keep the tokens whose
    cumulative probability is <= p (at least the most likely one); the token that crosses p is
    dropped (transformers keeps it). Ties at the threshold are kept. logits (B, V)."""
    if p is None:
        return logits
    xp = array_module(logits)
    sorted_desc = -xp.sort(-logits, axis=-1)
    cumulative = xp.cumsum(layers.softmax(sorted_desc), axis=-1)
    n_keep = xp.maximum((cumulative <= p).sum(axis=-1), 1)               # (B,)
    threshold = xp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    return xp.where(logits < threshold, -1e10, logits)


def sample_next(logits, temperature, top_k, top_p, rng):
    """Pick the next token of each row. logits (B, V) -> ids (B,), on the logits' device.

    temperature 0 is greedy (argmax). Otherwise logits / temperature, then top-k, then top-p,
    then a draw from the softmax. The uniform numbers come from ``rng`` (a NumPy Generator on the
    host), so a seed samples the same tokens on CPU and GPU up to rounding of the probabilities.

    The division is done as (logits - row max) / temperature in float64: the same softmax,
    but every value is <= 0, so a tiny temperature sends the others to -inf (probability 0)
    instead of overflowing to inf - inf = NaN. As temperature -> 0 the draw becomes the argmax
    (a tie at the top shared evenly), the limit of the softmax, at any temperature however small.
    """
    xp = array_module(logits)
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):   # -x / tiny temperature -> -inf is the point
        z = (z - z.max(axis=-1, keepdims=True)) / temperature               # (B, V), <= 0
    z = top_p_logits(top_k_logits(z, top_k), top_p)
    cdf = xp.cumsum(layers.softmax(z), axis=-1)                             # (B, V)
    u = xp.asarray(rng.random(logits.shape[0]))[:, None] * cdf[:, -1:]
    ids = (cdf < u).sum(axis=-1)
    return xp.minimum(ids, logits.shape[-1] - 1)


def mask_padded_logits(logits, V):
    """In place: logits (B, T, Vp) of a padded vocabulary get, in columns V.., the lowest finite
    value of their dtype, whose softmax is exactly 0 (so their gradient is 0 too). Not -inf: an
    online softmax whose running max starts at -inf would compute -inf - -inf = NaN."""
    if logits.shape[-1] > V:
        logits[..., V:] = array_module(logits).finfo(logits.dtype).min


# ----------------------------------------------------------------------------------------------
# the model


class GPT:
    """GPT-2 with hand-written forward and backward passes.

    ``GPT(cfg, seed=0, device="cpu", dtype="float32")`` initialises as the paper (§2.3).
    ``model.params`` maps GPT-2's parameter names to arrays (NumPy on "cpu", CuPy on "gpu").
    ``logits, loss = model.forward(idx, targets)`` then ``grads = model.backward()``.
    ``layers="reference"`` computes with the readable ``layers.py`` instead of the fast set
    (``model.layers`` is the set in use; see LAYER_SETS and docs/architecture.md).
    ``params=`` gives the weights instead of initialising them: a dict like ``model.params``,
    with every name and shape of ``config.param_shapes(cfg)``, of one floating-point dtype
    (cast to ``dtype``) and finite; anything else is refused with the tensor named.
    ``pad_vocab=64`` (or 128) computes the LM head over the vocabulary rounded up to a multiple
    of it (GPT-2's 50,257 -> 50,304), the shape matrix-multiply tiles want; see ``_padded_head``.
    """

    def __init__(self, cfg: GPTConfig, seed: int = 0, device: str = "cpu", dtype="float32",
                 *, params: dict | None = None, precision: str = "float32",
                 recompute: bool = False, layers: str = "fast", pad_vocab: int = 1):
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(cfg).__name__}")
        if layers not in LAYER_SETS:
            raise ValueError(f"layers must be one of {LAYER_SETS}, got {layers!r}")
        self.config = cfg
        self.device = resolve_device(device)
        self.xp = get_xp(self.device)
        self.dtype = resolve_dtype(dtype)
        self._layer_kind = layers
        self.precision = precision   # picks the layer set (model.layers)
        # recompute: keep only each block's input in the forward and run the block's forward
        # again in the backward, just before its backward: activation memory of one block
        # instead of n_layer blocks, for about a third more compute
        self.recompute = bool(recompute)
        self.loss_scale = 2.0 ** 16 if precision == "float16" else 1.0
        self.on_block = None   # called with no arguments after each block's forward and backward
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, pad_vocab)
        if params is None:
            host = init_params(cfg, seed, self.dtype)
        else:   # names, shapes and dtypes as the config lays them out; then no NaN or inf
            check_params(cfg, params, f"GPT(params=...) does not match {cfg}")
            host = {name: params[name] for name in param_shapes(cfg)}
        with np.errstate(over="ignore"):   # a value too large for dtype is refused just below
            self.params = {name: self.xp.array(p, dtype=self.dtype) for name, p in host.items()}
        if params is not None:   # after the cast: a float64 1e300 is inf in float32
            check_finite(self.params, "GPT(params=...)")
        self.training = True
        self.dropout_rng = self._make_rng(seed)
        self._cache = None

    @property
    def precision(self) -> str:
        """"float32", "tf32" or "float16": how forward and backward compute (see PRECISIONS)."""
        return self._precision

    @precision.setter
    def precision(self, value):
        if value not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {value!r}")
        if value == "tf32" and self.device != "gpu":
            raise ValueError("precision 'tf32' is a GPU tensor-core mode: use device='gpu', or "
                             "precision 'float32' on the CPU")
        if value != "float32" and self.dtype != np.float32:
            raise ValueError(f"precision {value!r} needs float32 weights, the model's dtype is "
                             f"{self.dtype.name}")
        if value != "float32" and self._layer_kind == "reference":
            raise ValueError(f"precision {value!r} is a feature of the fast layers; the reference "
                             "layers compute in float32 or float64: use layers='fast' or "
                             "precision 'float32'")
        self._precision = value
        self.layers = self._layer_set(value)
        self._step_layers = self._layer_set("float32")   # generation: full-precision weights
        if self.device == "gpu":   # TF32: set here, with the layer set, not at every forward
            from .fast import gpu_layers
            gpu_layers.set_tf32(value in ("tf32", "float16"))

    def _layer_set(self, precision):
        """The functions that compute the layers for a precision: chosen here, once, not per call."""
        if self._layer_kind == "reference":
            return layers
        fast = cpu_layers
        if self.device == "gpu":
            from .fast import gpu_layers  # imports CuPy and the CUDA kernels: only on the GPU
            fast = gpu_layers
        return fast.FLOAT16 if precision == "float16" else fast

    def _make_rng(self, seed):
        if self.xp is np:
            return np.random.default_rng(seed)
        return self.xp.random.default_rng(seed)

    def _compute_params(self):
        """The weights the layers multiply with: model.params, or their float16 copies in mixed
        precision (made each forward, as the float32 masters change every step); wte padded
        with zero rows to ``padded_vocab_size`` when the model pads its vocabulary."""
        P = self.params
        if self.precision == "float16":
            P = {name: p.astype(np.float16) for name, p in P.items()}
        return self._padded_head(P)

    def _padded_head(self, P):
        """P with wte (V, C) as (Vp, C), rows V.. zero. Only the LM head sees the padded rows:
        the embedding reads rows < V; their logits are masked in ``forward`` (softmax 0, so
        gradient 0), and ``backward`` returns wte's gradient for the V real rows. model.params,
        checkpoints and the Hugging Face export keep V rows. Generation computes B rows of
        logits, not B*T, and does not pad."""
        wte = P["wte.weight"]
        if self.padded_vocab_size == wte.shape[0]:
            return P
        padded = self.xp.zeros((self.padded_vocab_size, wte.shape[1]), dtype=wte.dtype)
        padded[:wte.shape[0]] = wte
        return {**P, "wte.weight": padded}

    def _block_rng(self, seed):
        """The dropout generator of one block under recompute: a fresh one from a seed drawn in
        the forward, so the backward's second forward draws the same masks."""
        return None if seed is None else self._make_rng(seed)

    def __repr__(self):
        c = self.config
        return (f"GPT(n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, "
                f"block_size={c.block_size}, vocab_size={c.vocab_size}, "
                f"device={self.device!r}, dtype={self.dtype.name!r})")

    # --- mode ---------------------------------------------------------------------------------

    def train(self, mode: bool = True):
        """Train mode: dropout (if cfg.dropout > 0) is active. A new model is in train mode."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Eval mode: no dropout; forward is deterministic."""
        return self.train(False)

    def num_params(self) -> int:
        return sum(int(p.size) for p in self.params.values())

    def _block(self, i, params=None):
        prefix = f"h.{i}."
        params = self.params if params is None else params
        return {name: params[prefix + name] for name, _ in BLOCK_PARAMS}

    # --- forward / backward ---------------------------------------------------------------------

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None).

        targets (B, T): the id that follows each position; -1 positions are ignored. With targets
        the caches are kept for ``backward()``; the loss is a 0-d array on the model's device.
        In float16 precision the logits are float16 and the loss float32. Ids out of range, wrong
        shapes or dtypes are refused before any computation (``io.inputs.forward_ids``).
        """
        cfg = self.config
        idx, targets = forward_ids(idx, targets, cfg, self.xp)
        p = cfg.dropout if self.training else 0.0
        rng = self.dropout_rng if p > 0 else None
        keep = targets is not None  # keep the activations only when a backward can follow
        self._cache = None
        P = self._compute_params()
        F = self.layers

        x, emb = F.embedding_forward(idx, P["wte.weight"], P["wpe.weight"])       # (B, T, C)
        x, drop = F.dropout_forward(x, p, rng)
        blocks = []
        for i in range(cfg.n_layer):
            if keep and self.recompute:   # keep the block's input and its dropout seed only
                seed = None if rng is None else int(rng.integers(0, 2 ** 62))
                blocks.append((x, seed))
                x, _ = block_forward(x, self._block(i, P), cfg.n_head, p, self._block_rng(seed),
                                     layer_set=F)
            else:
                x, cache = block_forward(x, self._block(i, P), cfg.n_head, p, rng, layer_set=F)
                if keep:
                    blocks.append(cache)
            if self.on_block is not None:
                self.on_block()
        h, ln_f = F.layernorm_forward(x, P["ln_f.weight"], P["ln_f.bias"], LAYER_NORM_EPS)
        B, T, C = h.shape
        logits = (h.reshape(-1, C) @ P["wte.weight"].T).reshape(B, T, -1)        # (B, T, Vp)
        V = cfg.vocab_size
        mask_padded_logits(logits, V)
        if targets is None:
            return logits[..., :V], None
        loss, ce = F.cross_entropy_forward(logits, targets)
        self._cache = (P, p, emb, drop, blocks, ln_f, h, ce)
        return logits[..., :V], loss

    def backward(self) -> dict:
        """Gradients of the last forward's loss: a dict with the keys and shapes of ``params``.

        The caches are released afterwards, so each forward allows one backward.
        In float16 precision the loss is multiplied by ``loss_scale`` before the backward, so
        that small gradients do not underflow float16, and the gradients are divided by it again
        (in float32) at the end: the result is d(loss)/d(param) in float32 all the same, with
        non-finite values where float16 overflowed.
        """
        if self._cache is None:
            raise RuntimeError("backward() needs a forward(idx, targets) just before it: there is "
                               "no loss to differentiate (forward without targets keeps none)")
        P, p, emb, drop, blocks, ln_f, h, ce = self._cache
        self._cache = None
        cfg, C = self.config, self.config.n_embd
        mixed = self.precision == "float16"
        scale = self.loss_scale if mixed else 1.0
        F = self.layers
        grads = {}
        dlogits = F.cross_entropy_backward(scale, ce)                             # (B, T, V)
        del ce   # (with the caller's reference gone, the logits are freed here, not at the end)
        # logits = h @ wte^T: the tied LM head's share of wte's gradient
        dlogits = dlogits.reshape(-1, dlogits.shape[-1])                          # (N, Vp)
        dwte_head = (dlogits.T @ h.reshape(-1, C))[:cfg.vocab_size]               # (V, C)
        dh = (dlogits @ P["wte.weight"]).reshape(h.shape)                         # (B, T, C)
        del dlogits
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = F.layernorm_backward(dh, ln_f)
        for i in reversed(range(cfg.n_layer)):
            cache = blocks[i]
            blocks[i] = None  # free this block's activations as soon as they are used
            if self.recompute:
                x, seed = cache
                _, cache = block_forward(x, self._block(i, P), cfg.n_head, p, self._block_rng(seed),
                                         layer_set=F)
            dx, g = block_backward(dx, cache)
            del cache
            for name, value in g.items():
                grads[f"h.{i}.{name}"] = value
            if self.on_block is not None:
                self.on_block()
        dx = F.dropout_backward(dx, drop)
        # wte is used twice, as the embedding and as the LM head: its gradients add (in float32
        # under mixed precision: a token's rows are summed into one)
        if mixed:
            dwte_head, dx = dwte_head.astype(np.float32), dx.astype(np.float32)
        grads["wte.weight"], grads["wpe.weight"] = F.embedding_backward(dx, emb, dwte_head)
        if mixed:
            xp = self.xp
            for name, g in grads.items():   # back to d(loss)/d(param), in float32
                grads[name] = xp.multiply(g, 1.0 / scale, dtype=np.float32)
        return {name: grads[name] for name in self.params}

    # --- generation with a KV cache ---------------------------------------------------------------

    def _forward_step(self, idx, kv, pos):
        """Logits of the last position for ids idx (B, T_new) at positions pos.., using and
        filling the KV cache ``kv`` (a list of (k, v) per layer). Inference only, no dropout:
        ``block_forward`` with ``layers.attention_step`` as its attention."""
        cfg, P, F = self.config, self.params, self._step_layers
        x, _ = F.embedding_forward(idx, P["wte.weight"], P["wpe.weight"][pos:])  # (B, T_new, C)
        for i, (k_cache, v_cache) in enumerate(kv):
            def attend(qkv, k_cache=k_cache, v_cache=v_cache):
                return F.attention_step(qkv, cfg.n_head, k_cache, v_cache, pos), None
            x, _ = block_forward(x, self._block(i), cfg.n_head, layer_set=F, attention=attend)
        h, _ = F.layernorm_forward(x[:, -1], P["ln_f.weight"], P["ln_f.bias"], LAYER_NORM_EPS)
        return h @ P["wte.weight"].T                                              # (B, V)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                 vocab_size=None):
        """Append ``max_new_tokens`` sampled tokens to idx (B, T) and return the whole (B, T + n).

        temperature 0 is greedy; top_k / top_p follow openai/gpt-2's sample.py (see
        ``top_k_logits``, ``top_p_logits``, ``sample_next``). ``vocab_size`` (default: the
        model's) restricts the draw to ids below it: a tokenizer smaller than the model's
        vocabulary (GPT-2's 50,257 tokens in a model padded to 50,304) can then decode every id.

        The context is cropped to the last block_size tokens. Keys and values of past positions
        are cached, so each new token costs one position's work until the context fills the
        block; after that each token costs one forward of block_size positions (the positions
        are absolute, so the cache cannot slide): a constant cost per token. The output is one
        array, allocated once, that the tokens are written into.
        """
        xp, cfg = self.xp, self.config
        V = generation_vocab(max_new_tokens, temperature, top_k, top_p, vocab_size, cfg.vocab_size)
        prompt = token_ids(idx, "idx", cfg, xp, crop=True)
        rng = np.random.default_rng(seed)
        (B, T0), T_max = prompt.shape, cfg.block_size
        out = xp.empty((B, T0 + max_new_tokens), dtype=np.int64)
        out[:, :T0] = prompt
        kv = [(xp.empty((B, cfg.n_head, T_max, cfg.head_size), dtype=self.dtype),
               xp.empty((B, cfg.n_head, T_max, cfg.head_size), dtype=self.dtype))
              for _ in range(cfg.n_layer)]
        start = pos = 0   # the cache holds out[:, start:start+pos]
        for n in range(T0, T0 + max_new_tokens):   # out[:, :n] is written; draw out[:, n]
            if n - start > T_max:            # the context no longer fits: crop and refill
                start, pos = n - T_max, 0
            logits = self._forward_step(out[:, start + pos:n], kv, pos)[:, :V]      # (B, V)
            pos = n - start
            if not bool(xp.isfinite(logits).all()):
                raise ValueError(f"the model's logits at position {n} are not finite (NaN or "
                                 "inf): its weights or activations overflow; sampling from them "
                                 "would print one token over and over")
            out[:, n] = sample_next(logits, temperature, top_k, top_p, rng)
        return out

    # --- Hugging Face layout ------------------------------------------------------------------------

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors in the layout of transformers' GPT2LMHeadModel."""
        from .io.hf import save_pretrained
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, device: str = "cpu", dtype="float32") -> "GPT":
        """Load GPT-2 weights saved by transformers (``GPT2LMHeadModel``/``GPT2Model``) or by
        ``save_pretrained``: config.json + model.safetensors, or the sharded form."""
        from .io.hf import load_pretrained
        cfg, params = load_pretrained(directory)
        return cls(cfg, device=device, dtype=dtype, params=params)
