"""Writing a file whole or not at all: the one helper every file minigpt2 saves goes through.

``write_atomic(path, content)`` writes into a temporary file in the target's folder, flushes and
fsyncs it, renames it over the target (a rename within one folder is atomic on POSIX and on
Windows), then fsyncs the folder so the rename itself survives a power cut. A reader sees the old
file or the new one, never a part; a failure leaves the old file as it was and no temporary file
behind. The file gets the permissions any new file would get (0666 less the user's umask, so
-rw-r--r-- under the usual umask 022), not the owner-only -rw------- of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory) -> None:
    """Make the renames and new names in ``directory`` durable (POSIX; a no-op elsewhere, where
    folders cannot be opened for fsync)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty file beside ``path`` with a name no one else uses, opened for writing.

    os.open with mode 0o666 lets the kernel apply the umask (mkstemp would force 0o600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def write_atomic(path, content=None, *, writer=None) -> Path:
    """Write ``path`` whole or not at all. Returns the path.

    content  bytes, or str (written as UTF-8)
    writer   instead of content: a function called with the temporary file's path that writes
             the file there (for libraries that save to a path, such as safetensors' save_file)

    The parent folder is created if missing. Any exception (from ``writer`` too) removes the
    temporary file and propagates; the previous ``path``, if any, is untouched.
    """
    if (content is None) == (writer is None):
        raise TypeError("write_atomic needs either content (bytes or str) or writer, not both")
    if isinstance(content, str):
        content = content.encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        if writer is None:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        else:
            umask_mode = os.fstat(fd).st_mode & 0o777     # what the umask gave the new file
            os.close(fd)
            writer(tmp)
            # a writer may replace the file with its own (safetensors writes a 0600 temporary
            # and renames it): give it back the permissions a new file gets
            if os.stat(tmp).st_mode & 0o777 != umask_mode:
                os.chmod(tmp, umask_mode)
            fd = os.open(tmp, os.O_RDONLY)   # flush what the writer wrote, whoever wrote it
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
