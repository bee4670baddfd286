"""``python -m minigpt2 download gpt2 DIR``: OpenAI's GPT-2 weights from the Hugging Face Hub.

Fetches config.json and model.safetensors over plain HTTPS (no extra library) into a temporary
folder inside DIR (each file through ``files.write_atomic``: whole and fsynced) and moves them
into place only after checking them: the config must be GPT-2's, and the weights must hold
exactly the tensors and shapes that config implies.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .files import fsync_dir, write_atomic

HUB = "https://huggingface.co"
REPOS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
         "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
FILES = ("config.json", "model.safetensors")


def _fetch(url: str, target: Path) -> None:
    write_atomic(target, writer=lambda tmp: _download(url, tmp))


def _download(url: str, target: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as f:
            size = response.headers.get("Content-Length")
            print(f"fetching {url}" + (f" ({int(size) / 1e6:,.0f} MB)" if size else ""),
                  file=sys.stderr)
            shutil.copyfileobj(response, f, length=1 << 20)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RuntimeError(f"cannot download {url} ({reason}): this machine seems to be offline "
                           "or the Hub unreachable; download on a connected machine and copy "
                           "the folder here") from None


def check_download(directory: Path) -> str:
    """Check config.json and the safetensors header against each other, without loading the
    weights. Returns a one-line summary."""
    from safetensors import safe_open

    from .config import param_shapes
    from .hf import config_from_hf
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()))
    expected = param_shapes(cfg)
    with safe_open(str(directory / "model.safetensors"), framework="numpy") as f:
        shapes = {k.removeprefix("transformer."): tuple(f.get_slice(k).get_shape())
                  for k in f.keys()}
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise ValueError(f"the downloaded weights do not match config.json at {name}: got "
                             f"{shapes.get(name)}, expected {shape}; try again")
    return f"{cfg.num_params():,} parameters, {cfg.n_layer} layers, context {cfg.block_size}"


def add_arguments(p):
    p.add_argument("model", choices=list(REPOS), help="which GPT-2")
    p.add_argument("dir", metavar="DIR", help="folder to write config.json + model.safetensors")
    p.add_argument("--hub", default=HUB, help=f"the Hub's address (default {HUB})")


def run(args) -> int:
    directory = Path(args.dir)
    if (directory / "model.safetensors").exists():
        raise FileExistsError(f"{directory / 'model.safetensors'} already exists; remove it or "
                              "choose another DIR")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=directory))
    try:
        for name in FILES:
            url = f"{args.hub.rstrip('/')}/{REPOS[args.model]}/resolve/main/{name}"
            _fetch(url, tmp / name)
        summary = check_download(tmp)
        for name in FILES:
            os.replace(tmp / name, directory / name)
        fsync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.model} in {directory}: {summary}")
    return 0
