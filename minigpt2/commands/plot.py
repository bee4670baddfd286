"""``python -m minigpt2 plot DIR``: the loss curves of a training run, as a PNG.

Reads ``DIR/metrics.jsonl`` (one JSON object per logged step, written by ``train``) and draws
the training loss of every logged step and the train/val estimates of every evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(directory) -> list[dict]:
    path = Path(directory) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; plot reads the --out folder of a train run")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n} is not JSON ({e})") from None
    if not rows:
        raise ValueError(f"{path} is empty: the run has not logged a step yet")
    return rows


def plot_path(output, directory) -> Path:
    """The file ``plot`` writes: ``output`` as given when it names a file with an extension
    matplotlib knows, ``output/loss.png`` for an existing folder, ``output.png`` for a name
    without extension (matplotlib would add it silently); default ``directory/loss.png``."""
    if output is None:
        return Path(directory) / "loss.png"
    output = Path(output)
    if output.is_dir():
        return output / "loss.png"
    if not output.suffix:
        return output.with_name(output.name + ".png")
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    known = Figure().canvas.get_supported_filetypes()
    if output.suffix[1:].lower() not in known:
        raise ValueError(f"--output {output}: matplotlib cannot write {output.suffix!r} files; "
                         f"use one of {', '.join('.' + k for k in sorted(known))}")
    return output


def plot_losses(rows: list[dict], output) -> Path:
    """Draw loss against step to the file ``output`` (PNG, or the format its extension names)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    steps = [r["step"] for r in rows if "loss" in r]
    ax.plot(steps, [r["loss"] for r in rows if "loss" in r], lw=0.8, alpha=0.5,
            label="training loss (one batch)")
    evals = [r for r in rows if "val_loss" in r]
    for key, marker in (("train_loss", "o"), ("val_loss", "s")):
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], marker=marker, ms=3,
                label=key.replace("_", " ") + " (estimate)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    output = Path(output)
    fig.savefig(output, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return output


def add_arguments(p):
    p.add_argument("dir", metavar="DIR", help="a train --out folder")
    p.add_argument("--output", "-o", help="the image to write (default DIR/loss.png; a folder "
                   "gets loss.png inside; a name without extension gets .png)")


def run(args) -> int:
    rows = read_metrics(args.dir)
    output = plot_losses(rows, plot_path(args.output, args.dir))
    print(f"wrote {output}")
    return 0
