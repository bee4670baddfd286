"""``python -m minigpt2 <command>``: see ``minigpt2.cli``."""

from .cli import main

raise SystemExit(main())
