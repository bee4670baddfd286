"""OpenAI's GPT-2 weights from the Hugging Face Hub, checked byte for byte (``download``; the
command ``python -m minigpt2 download gpt2 DIR`` calls it).

Each model is pinned to one commit of its official repository (``PINNED``), so the command fetches
the same bytes every time, whatever the repository's ``main`` branch becomes. A download:

1. asks the Hub what it publishes for that commit (``/api/models/{repo}/revision/{commit}`` with
   ``?blobs=true``): each file's size, its git blob id and, for a large (LFS) file, the SHA-256 of
   its content. For a pinned commit that SHA-256 must equal the one kept in ``PINNED``;
2. fetches config.json and model.safetensors from that exact commit over plain HTTPS (no extra
   library) into a temporary folder inside DIR, each through ``files.write_atomic``. A cut
   transfer is resumed with an HTTP Range request; after ``TRIES`` tries in a row that bring no
   new byte it gives up. The waits between tries start at ``RETRY_DELAY_S`` and double;
3. checks every file: its size, the Hub's digest (the SHA-256 for an LFS file; for a small file
   the git blob SHA-1, ``sha1(b"blob <size>\\0" + content)``) and, for a pinned commit, the SHA-256
   kept in ``PINNED``. A file that fails is deleted and the command stops with one line naming the
   file, the digest expected and the digest got;
4. checks config.json against the safetensors header (every tensor's name and shape) and only
   then moves both files into DIR. A failure, or Ctrl-C, removes the temporary folder: DIR never
   holds part of a file.

``--revision`` fetches another revision (branch, tag or commit): it is resolved to a commit once,
every file comes from that commit, and only the Hub's digests are checked (minigpt2 keeps none
for it). ``--hub`` or the environment variable ``MINIGPT2_HUB_URL`` point at a mirror.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .files import fsync_dir, write_atomic

HUB = "https://huggingface.co"
REPOS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
         "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
FILES = ("config.json", "model.safetensors")

# model -> (commit of its official repository, {file: SHA-256 of the file's content at that
# commit}). These are published values, recorded by projects that pin the same commits, not
# values minigpt2 computed; the weights' SHA-256 is also the LFS object id the Hub lists.
PINNED = {
    "gpt2": ("607a30d783dfa663caf39e06633721c8d4cfcd7e", {
        "config.json": "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4",
        "model.safetensors": "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"}),
    "gpt2-medium": ("6dcaa7a952f72f9298047fd5137cd6e4f05f41da", {
        "config.json": "ef1a44d889ad1a0acc7731c78134f1b87d2d222f110e97dd10fd4117331caf22",
        "model.safetensors": "fc5a354a19255ad494f3d71549390baca1ccf61d1d822b9408971705c687c9cd"}),
    "gpt2-large": ("32b71b12589c2f8d625668d2335a01cac3249519", {
        "config.json": "7fccdcfd6622055342a734c663ee0b61ff4fd697f42467595df0bf4448c8c170",
        "model.safetensors": "5f47f3e12f91cd33b662ce7e433b6150ad5512b5884a2cee961b50e9c3bbebce"}),
    "gpt2-xl": ("15ea56dee5df4983c59b2538573817e1667135e2", {
        "config.json": "be48115d52314bc27327e160bf10197760db02ea689d10adb24db4102edf7a8a",
        "model.safetensors": "0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a"}),
}

TRIES = 5             # tries in a row without a new byte before a transfer is given up
RETRY_DELAY_S = 1.0   # wait before the first retry; doubled after each further try
TIMEOUT_S = 60        # seconds of silence before a connection counts as cut
CHUNK = 1 << 20

_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DownloadError(RuntimeError):
    """A download that cannot be completed or verified; the message is one line for the user."""


class _Transient(Exception):
    """A failure worth another try (a cut connection, a timeout, HTTP 5xx or 429)."""


def _hub_url() -> str:
    return os.environ.get("MINIGPT2_HUB_URL") or HUB


def _quote(revision: str) -> str:
    return urllib.parse.quote(revision, safe="")


def _unreachable(e: urllib.error.URLError) -> bool:
    """True for the errors of a machine that cannot reach the host at all (no DNS, refused, no
    route): retrying would only delay the message."""
    reason = getattr(e, "reason", None)
    return isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or (
        isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH))


def _open(what: str, url: str, headers=None):
    """urlopen that sorts failures: _Transient for those worth a retry, DownloadError (its
    message starting with ``what``) for the rest."""
    request = urllib.request.Request(url, headers={"User-Agent": "minigpt2", **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        hint = {401: "the repository is private or gated", 403: "access is refused",
                404: "no such repository, revision or file",
                416: "the server holds fewer bytes than the Hub lists: its copy is truncated"
                }.get(e.code, e.reason)
        raise DownloadError(f"{what}: {url} answered HTTP {e.code} ({hint})") from None
    except urllib.error.URLError as e:
        if not _unreachable(e) and isinstance(e.reason, (TimeoutError, ConnectionError)):
            raise _Transient(str(e.reason)) from None
        raise
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise _Transient(f"{type(e).__name__}: {e}") from None


def _pause(what: str, cause: str, tries: int) -> None:
    """After a failed try: give up after TRIES tries, else say so on stderr and back off."""
    if tries >= TRIES:
        raise DownloadError(f"{what}: {cause}; gave up after {TRIES} tries, try again later")
    delay = RETRY_DELAY_S * 2 ** (tries - 1)
    print(f"  {what}: {cause}; trying again in {delay:g} s ({tries + 1} of {TRIES})",
          file=sys.stderr)
    time.sleep(delay)


def _offline(url: str, e: urllib.error.URLError) -> DownloadError:
    return DownloadError(f"cannot download {url} ({getattr(e, 'reason', e)}): this machine seems "
                         "to be offline or the Hub unreachable; download on a connected machine "
                         "and copy the folder here")


def hub_listing(hub: str, repo: str, revision: str) -> tuple[str, dict]:
    """The Hub's description of ``repo`` at ``revision``: (the commit it resolves to,
    {file name: (size in bytes, digest kind "sha256" or "git-sha1", hex digest)}) for the files
    of FILES the revision has."""
    url = f"{hub.rstrip('/')}/api/models/{repo}/revision/{_quote(revision)}?blobs=true"
    tries = 0
    while True:
        tries += 1
        try:
            with _open(f"the listing of {repo}", url) as response:
                body = response.read()
            break
        except _Transient as e:
            _pause(f"the listing of {repo}", str(e), tries)
        except urllib.error.URLError as e:
            if _unreachable(e) or tries >= TRIES:
                raise _offline(url, e) from None
            _pause(f"the listing of {repo}", str(e.reason), tries)
    try:
        info = json.loads(body)
        commit = info["sha"]
        entries = {entry["rfilename"]: entry for entry in info["siblings"]}
        files = {}
        for name in FILES:
            if name not in entries:
                continue
            entry = entries[name]
            if entry.get("lfs"):
                size, kind, digest = entry["lfs"]["size"], "sha256", entry["lfs"]["sha256"]
            else:
                size, kind, digest = entry["size"], "git-sha1", entry["blobId"]
            if not (isinstance(size, int) and size >= 0 and isinstance(digest, str)
                    and (_SHA256 if kind == "sha256" else _SHA1).fullmatch(digest)):
                raise ValueError(name)
            files[name] = (size, kind, digest)
        if not (isinstance(commit, str) and _SHA1.fullmatch(commit)):
            raise ValueError("sha")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DownloadError(f"{url} did not answer with the Hub's file listing "
                            f"({type(e).__name__}: {e}); check --hub / MINIGPT2_HUB_URL") from None
    if _SHA1.fullmatch(revision) and commit != revision:
        raise DownloadError(f"{url} describes commit {commit}, not the {revision} asked for; "
                            "check --hub / MINIGPT2_HUB_URL")
    return commit, files


class _Digests:
    """SHA-256 of the bytes so far, and the git blob SHA-1 when the Hub gives only that."""

    def __init__(self, size: int, git: bool):
        self.size, self.git = size, git
        self.reset()

    def reset(self) -> None:
        """Back to zero bytes (the server ignored a Range request and sends the whole file)."""
        self.done = 0
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(f"blob {self.size}\0".encode()) if self.git else None

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        if self.sha1 is not None:
            self.sha1.update(chunk)
        self.done += len(chunk)


def _transfer(url: str, name: str, part: Path, size: int, digests: _Digests) -> _Digests:
    """Fetch ``url`` into ``part``, resuming with Range requests after a cut. Returns the digests
    of exactly ``size`` bytes."""
    tries = 0
    with _disk(name, part, lambda: open(part, "wb")) as f:
        while digests.done < size:
            tries += 1
            before = digests.done
            try:
                _receive(url, name, f, part, size, digests)
                if digests.done < size:
                    raise _Transient("the connection closed early")
            except _Transient as e:
                cause = str(e)
            except urllib.error.URLError as e:   # the host went away after the listing came
                cause = str(e.reason)
            else:
                break
            if digests.done > before:   # progress: the tries start over
                tries = 1
            _pause(name, f"{cause} at byte {digests.done:,} of {size:,}", tries)
    return digests


def _disk(name: str, part: Path, action):
    """``action()``, with an OSError (the disk's: full, read-only, ...) as one line for the user."""
    try:
        return action()
    except OSError as e:
        raise DownloadError(f"{name}: cannot write {part} ({e.strerror or e}); free some space "
                            "or choose another DIR") from None


def _receive(url: str, name: str, f, part: Path, size: int, digests: _Digests) -> None:
    """One request: from byte ``digests.done`` on, append what arrives to ``f``. A connection
    that breaks is a _Transient; what was received before the break is kept."""
    offset = digests.done
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with _open(name, url, headers) as response:
        if response.headers.get_content_type() == "text/html":
            raise DownloadError(f"{name}: {url} answered with an HTML page (an error or login "
                                "page?) instead of the file; check --hub / MINIGPT2_HUB_URL")
        if offset and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                raise DownloadError(f"{name}: asked for bytes {offset}- of {url}, got "
                                    f"'{content_range}'")
        elif offset:   # the server ignored the Range header: start over
            _disk(name, part, lambda: (f.seek(0), f.truncate()))
            digests.reset()
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:   # reset, timeout, TLS cut, ...
                raise _Transient(f"{type(e).__name__}: {e}") from None
            if not chunk:
                return
            if digests.done + len(chunk) > size:
                raise DownloadError(f"{name}: {url} sent more than the {size:,} bytes the Hub "
                                    "lists for it")
            _disk(name, part, lambda: f.write(chunk))
            digests.update(chunk)


def fetch_verified(url: str, target: Path, *, size: int, kind: str, digest: str,
                   pinned_sha256: str | None = None) -> None:
    """Download ``url`` to ``target`` (whole or not at all) and check its size, the Hub's
    ``digest`` of ``kind`` ("sha256" or "git-sha1") and, when given, ``pinned_sha256``. Raises
    DownloadError with one line naming the file, expected and got; nothing is left behind."""
    name = target.name
    print(f"fetching {url} ({size / 1e6:,.1f} MB)", file=sys.stderr)

    def writer(part: Path) -> None:
        got = _transfer(url, name, part, size, _Digests(size, git=kind == "git-sha1"))
        checks = [("SHA-256" if kind == "sha256" else "git blob SHA-1", digest,
                   (got.sha256 if kind == "sha256" else got.sha1).hexdigest(), "the Hub's")]
        if pinned_sha256 is not None:
            checks.append(("SHA-256", pinned_sha256, got.sha256.hexdigest(), "minigpt2's pinned"))
        for label, expected, actual, whose in checks:
            if actual != expected:
                with open(part, "rb") as f:
                    html = f.read(512).lstrip().lower().startswith((b"<!doctype html", b"<html"))
                cause = " (the server sent an HTML page)" if html else ""
                raise DownloadError(f"{name}: {label} mismatch{cause}: expected {expected} "
                                    f"({whose}), got {actual}; the file was deleted: the download "
                                    "was corrupted or tampered with, try again or another mirror")

    write_atomic(target, writer=writer)


def check_download(directory: Path) -> str:
    """Check config.json and the safetensors header against each other, without loading the
    weights. Returns a one-line summary."""
    from safetensors import SafetensorError, safe_open

    from ..config import param_shapes
    from .hf import config_from_hf
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()))
    expected = param_shapes(cfg)
    try:
        with safe_open(str(directory / "model.safetensors"), framework="numpy") as f:
            shapes = {k.removeprefix("transformer."): tuple(f.get_slice(k).get_shape())
                      for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{directory / 'model.safetensors'} is not a readable safetensors file "
                         f"({e}); download it again") from None
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise ValueError(f"the downloaded weights do not match config.json at {name}: got "
                             f"{shapes.get(name)}, expected {shape}; try again")
    return f"{cfg.num_params():,} parameters, {cfg.n_layer} layers, context {cfg.block_size}"


def download(model: str, directory, revision: str | None = None, hub: str | None = None) -> str:
    """Fetch ``model`` (a key of REPOS) into ``directory`` as described above: config.json and
    model.safetensors, whole and verified, or nothing. ``revision`` None: the pinned commit;
    ``hub`` None: $MINIGPT2_HUB_URL, else HUB. Returns a one-line summary of what was written."""
    if model not in REPOS:
        raise ValueError(f"no GPT-2 named {model!r}: choose one of {', '.join(REPOS)}")
    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        raise FileExistsError(f"{directory / 'model.safetensors'} already exists; remove it or "
                              "choose another DIR")
    directory.mkdir(parents=True, exist_ok=True)   # a DIR we cannot create fails before the network
    hub = (hub or _hub_url()).rstrip("/")
    repo = REPOS[model]
    pinned_commit, pinned_digests = PINNED[model]
    commit, listing = hub_listing(hub, repo, revision or pinned_commit)
    pinned = pinned_digests if commit == pinned_commit else {}
    if not pinned:
        print(f"{repo} at {commit} is not the commit minigpt2 pins ({pinned_commit}): checking "
              "the files against the Hub's digests only", file=sys.stderr)
    for name in FILES:
        if name not in listing:
            raise DownloadError(f"{repo} at {commit} has no {name}; choose a revision that does")
        size, kind, digest = listing[name]
        if kind == "sha256" and name in pinned and digest != pinned[name]:
            raise DownloadError(f"{name}: the Hub at {hub} lists SHA-256 {digest} for {repo} at "
                                f"{commit}, but minigpt2 pins {pinned[name]}; this is not the "
                                "official file, nothing was downloaded")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=directory))
    try:
        for name in FILES:
            size, kind, digest = listing[name]
            url = f"{hub}/{repo}/resolve/{commit}/{name}"
            fetch_verified(url, tmp / name, size=size, kind=kind, digest=digest,
                           pinned_sha256=pinned.get(name))
        summary = check_download(tmp)
        for name in FILES:
            os.replace(tmp / name, directory / name)
        fsync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"{model} ({repo} at {commit}, verified) in {directory}: {summary}"
