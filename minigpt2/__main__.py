"""``python -m minigpt2 <command>``: see ``minigpt2.commands``."""

from .commands import main

raise SystemExit(main())
