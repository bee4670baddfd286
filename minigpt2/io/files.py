"""Writing a file whole or not at all (``write_atomic``), the lock that keeps a folder to one
process (``FolderLock``), and a file's SHA-256 (``sha256_file``, which checkpoints and shards are
checked with).

Which saves go through ``write_atomic``: every file minigpt2 writes in one piece (a checkpoint's
weights, optimizer state and state.json, the Hugging Face config and weights, tokenizer files,
``prepare``'s state and manifest, ``eval``'s JSON results, the metrics log a run starts from, each
downloaded file, checked against its SHA-256 before it is kept). A checkpoint and a download are
written this way into a staging folder, then renamed into place file by file (a checkpoint's
state last). Token files and shards, written as the ids arrive, keep the same rule in data/'s
writers: a temporary name, fsync, rename. An ``overlap`` Bloom filter is renamed over its target
from a ``.tmp`` file but not fsynced. Written in place, not atomically: the metrics log while a run
appends to it, the JSONL rows of ``eval`` / ``overlap --out``, ``tokenizer encode/decode --out``
and ``plot``'s PNG.

``write_atomic(path, content)`` writes into a temporary file in the target's folder, flushes and
fsyncs it, renames it over the target (a rename within one folder is atomic on POSIX and on
Windows), then fsyncs the folder so the rename itself survives a power cut. A reader sees the old
file or the new one, never a part; a failure leaves the old file as it was and no temporary file
behind. The file gets the permissions any new file would get (0666 less the user's umask, so
-rw-r--r-- under the usual umask 022), not the owner-only -rw------- of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import json
import hashlib
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


class FolderInUse(RuntimeError):
    """Another process holds the lock of a folder (see ``FolderLock``)."""


class FolderLock:
    """An exclusive lock on a folder for as long as a process works in it.

    ``acquire`` takes ``fcntl.flock`` on ``directory/.lock`` and writes who holds it (pid, host,
    the UTC time it was taken) into that file. The kernel drops the lock when its holder exits,
    however it exits (``kill -9`` included), so a lock is never left held by a dead process; the
    file itself may remain, and the next holder takes it over. ``release`` removes the file while
    still holding the lock; a process that opened the removed file meanwhile notices (its file
    is no longer the one at the path) and tries again, so two holders never coexist.

    A second ``acquire`` on the same folder, from any process (this one included), raises
    ``FolderInUse`` naming the holder and changes nothing in the folder. Where ``fcntl`` does not
    exist (Windows) there is no lock. Also a context manager.
    """

    NAME = ".lock"

    def __init__(self, directory, what: str = "this folder"):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / self.NAME
        self._fd = None
        self._made_folder = False

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:      # no flock here: run unlocked
            return self
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            self._made_folder = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderInUse(f"{self.directory} is in use by another {self.what} "
                                  f"({holder}); wait for it to end or stop it, or use another "
                                  "folder") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)         # the holder removed this file as it let go: take the new one
        import datetime
        import socket
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": since}).encode() + b"\n")
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)   # while still held: see the class docstring
            if self._made_folder:
                try:
                    self.directory.rmdir()      # made for the lock alone and still empty
                except OSError:
                    pass
        finally:
            os.close(self._fd)                  # closing lets the lock go
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd) -> str:
    """'pid N on HOST since TIME' from a lock file's content (as ``FolderLock`` writes it)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode())
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes (hex), read in chunks of ``chunk`` bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
