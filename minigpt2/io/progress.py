"""A progress bar on stderr (tqdm), or an object that does nothing when none is wanted."""

from __future__ import annotations

import sys


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, text, refresh=True):
        pass

    def close(self):
        pass


def progress_bar(total, desc: str, unit: str, progress, long_run: bool = False):
    """A tqdm bar on stderr when asked (progress=True), or when None, on a terminal for long
    runs; otherwise an object that does nothing. ``total`` None: no known end."""
    show = progress if progress is not None else (long_run and sys.stderr.isatty())
    if not show:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False,
                dynamic_ncols=True, file=sys.stderr)
