"""``python -m minigpt2 download gpt2 DIR``: OpenAI's GPT-2 weights, pinned and verified.

The work (the pinned commits, resumed transfers, the digest checks) is ``io.download``'s.
"""

from __future__ import annotations

from ..io.download import HUB, REPOS, download


def add_arguments(p):
    p.add_argument("model", choices=list(REPOS), help="which GPT-2")
    p.add_argument("dir", metavar="DIR", help="folder to write config.json + model.safetensors")
    p.add_argument("--revision", default=None,
                   help="a branch, tag or commit of the repository instead of the pinned commit "
                        "(checked against the Hub's digests only)")
    p.add_argument("--hub", default=None,
                   help=f"the Hub's address (default: $MINIGPT2_HUB_URL, else {HUB})")


def run(args) -> int:
    print(download(args.model, args.dir, args.revision, args.hub))
    return 0
