"""Reading JSONL (one JSON object per line) with errors that name the file and the line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def check_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file")
    return path


def iter_jsonl(path, fields=()):
    """Yield (line number, object) for each non-blank line; every object must hold ``fields``.

    A line that is not a JSON object, or lacks a field, is a ValueError naming path:line."""
    path = check_file(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                                 f"column {e.start + 1}); a JSONL file is UTF-8 text, one JSON "
                                 "object per line") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column "
                                 f"{e.colno}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object {{...}}, got "
                                 f"{type(obj).__name__}")
            missing = [k for k in fields if k not in obj]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field {missing[0]!r} (each line "
                                 f"needs {', '.join(repr(k) for k in fields)})")
            yield lineno, obj


def read_jsonl(path, fields=()) -> list[tuple[int, dict]]:
    """All (line number, object) pairs of a JSONL file; an empty file is a ValueError."""
    rows = list(iter_jsonl(path, fields))
    if not rows:
        raise ValueError(f"{path} holds no examples (an empty JSONL file)")
    return rows


def check_writable(path, flag="--out") -> Path:
    """Refuse, before any work is done, an output path that cannot be written: a folder, a
    parent that is a file, or a place this process may not create files in (tried with a
    temporary file, which also catches read-only file systems and holds for root)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent       # the nearest folder that exists: the rest will be made
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
        if path.exists():
            with open(path, "ab"):
                pass
    except OSError as e:
        raise PermissionError(f"{flag} {path} cannot be written ({e.strerror}); choose "
                              "another path") from None
    return path


def write_jsonl(path, rows) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
