"""minigpt2 against Hugging Face transformers and PyTorch autograd, on the same weights.

Every tensor of a small GPT2LMHeadModel is redrawn (biases and LayerNorm too), saved with
transformers' own save_pretrained, and loaded with GPT.from_pretrained in float64. Errors are per
tensor, ||a - b|| / ||b||. Our targets are aligned (targets[b, t] follows idx[b, t]); the torch
loss is cross-entropy on the unshifted logits, not transformers' ``labels=`` (which shifts).
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from minigpt2 import GPT, AdamW  # noqa: E402
from minigpt2.gradcheck import rel_error  # noqa: E402

TOL = 1e-8
V, T_MAX = 29, 16


def hf_config(**overrides):
    kw = dict(n_layer=3, n_head=2, n_embd=16, n_positions=T_MAX, vocab_size=V,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=V - 1,
              eos_token_id=V - 1)
    kw.update(overrides)
    return transformers.GPT2Config(**kw)


def redrawn_hf_model(seed=0, attn="eager", cls=None, **overrides):
    torch.manual_seed(seed)
    cls = cls or transformers.GPT2LMHeadModel
    model = cls(hf_config(attn_implementation=attn, **overrides)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "ln_" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A redrawn GPT2LMHeadModel saved by transformers, and its folder."""
    hf = redrawn_hf_model()
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return hf, folder


def batch(seed=0, B=2, T=T_MAX):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, V, size=(B, T))
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 3] = -1
    return idx, targets


def torch_loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.as_tensor(targets).reshape(-1),
                                             ignore_index=-1)


def ours_name(hf_name):
    return hf_name[len("transformer."):]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_loss_and_every_gradient(saved, attn):
    hf, folder = saved
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation=attn,
                                                      dtype=torch.float64).eval()
    model = GPT.from_pretrained(folder, dtype="float64")
    idx, targets = batch()

    logits, loss = model.forward(idx, targets)
    grads = model.backward()

    hf.zero_grad()
    ref_logits = hf(torch.as_tensor(idx)).logits
    ref_loss = torch_loss(ref_logits, targets)
    ref_loss.backward()

    assert rel_error(logits, ref_logits.detach().numpy()) < TOL
    assert abs(float(loss) - ref_loss.item()) / abs(ref_loss.item()) < TOL
    checked = 0
    for name, p in hf.named_parameters():
        if name == "lm_head.weight":
            continue   # tied: the same tensor as transformer.wte.weight
        err = rel_error(grads[ours_name(name)], p.grad.numpy())
        assert err < TOL, f"{name}: {err:.2e}"
        checked += 1
    assert checked == len(model.params)


def test_our_save_pretrained_loads_in_transformers(tmp_path, saved):
    _, folder = saved
    model = GPT.from_pretrained(folder, dtype="float64")
    model.save_pretrained(tmp_path / "ours")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours", dtype=torch.float64).eval()
    idx, _ = batch(seed=3)
    with torch.no_grad():
        ref = hf(torch.as_tensor(idx)).logits.numpy()
    assert rel_error(model.forward(idx)[0], ref) < TOL
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["n_positions"] == T_MAX and config["bos_token_id"] == config["eos_token_id"] == V - 1


def test_float32_round_trip_through_transformers(tmp_path):
    from minigpt2 import GPTConfig
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=8, vocab_size=50), seed=1)
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = np.random.default_rng(0).integers(0, 50, size=(2, 8))
    with torch.no_grad():
        ref = hf(torch.as_tensor(idx)).logits.numpy()
    assert rel_error(model.forward(idx)[0], ref) < 1e-5
    again = GPT.from_pretrained(tmp_path)
    for name, p in model.params.items():
        np.testing.assert_array_equal(again.params[name], p)


def test_adamw_follows_torch_for_ten_steps(saved):
    hf, folder = saved
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float64).train()
    model = GPT.from_pretrained(folder, dtype="float64")
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = AdamW(model.params, **hyper)
    params = [p for n, p in hf.named_parameters() if n != "lm_head.weight"]
    ref_opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": hyper["weight_decay"]},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"])
    for step in range(10):
        idx, targets = batch(seed=step)
        _, loss = model.forward(idx, targets)
        opt.step(model.backward())
        ref_opt.zero_grad()
        ref_loss = torch_loss(hf(torch.as_tensor(idx)).logits, targets)
        ref_loss.backward()
        ref_opt.step()
        assert abs(float(loss) - ref_loss.item()) / ref_loss.item() < TOL, f"step {step}"
    for name, p in hf.named_parameters():
        if name != "lm_head.weight":
            assert rel_error(model.params[ours_name(name)], p.detach().numpy()) < TOL, name


def test_greedy_generation_matches_transformers(saved):
    hf, folder = saved
    model = GPT.from_pretrained(folder, dtype="float64")
    prompt = np.array([[3, 7, 1], [5, 5, 20]])
    ours = model.generate(prompt, max_new_tokens=T_MAX - 3, temperature=0)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(prompt), max_new_tokens=T_MAX - 3, do_sample=False,
                          eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(torch.as_tensor(prompt)))
    np.testing.assert_array_equal(ours, ref.numpy())


def test_gpt2model_layout_and_old_buffers_load(tmp_path):
    """GPT2Model writes keys without "transformer."; old checkpoints carry attn.bias buffers."""
    from safetensors.numpy import load_file, save_file
    base = redrawn_hf_model(seed=4, cls=transformers.GPT2Model)
    base.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "h.0.attn.c_attn.weight" in tensors
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, T_MAX, T_MAX), dtype=np.uint8))
    tensors["h.0.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = GPT.from_pretrained(tmp_path, dtype="float64")
    idx, _ = batch()
    with torch.no_grad():
        hidden = base(torch.as_tensor(idx)).last_hidden_state
        ref = hidden @ base.wte.weight.T
    assert rel_error(model.forward(idx)[0], ref.numpy()) < TOL


def test_sharded_checkpoint_loads(tmp_path, saved):
    hf, _ = saved
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    model = GPT.from_pretrained(tmp_path, dtype="float64")
    idx, _ = batch()
    with torch.no_grad():
        ref = hf(torch.as_tensor(idx)).logits.numpy()
    assert rel_error(model.forward(idx)[0], ref) < TOL
