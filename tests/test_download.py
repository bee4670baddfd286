"""``download`` against a fake Hugging Face Hub on the loopback address (offline).

The fake Hub serves one tiny GPT-2 repository at one commit the way the real one does: the API's
file listing with sizes, git blob ids and the LFS SHA-256, config.json directly, and
model.safetensors through a redirect to a content-addressed "CDN" path, with Range support. Each
test then breaks one thing: a connection cut mid-file, a server that stalls or ignores Range, an
HTML page served with 200, a tampered or truncated file, a listing that disagrees with the pins.
"""

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import run_cli as run_subprocess

from minigpt2 import GPT, GPTConfig
from minigpt2.io import download
from minigpt2.commands import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"   # the fake repository's only commit
REPO = download.REPOS["gpt2"]
HTML = b"<!DOCTYPE html><html><body><h1>Service unavailable</h1></body></html>\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The state the request handler serves from; tests change it to break things."""

    def __init__(self, files):
        self.files = dict(files)        # what the listing describes
        self.served = dict(files)       # what is actually sent
        self.cut_once = set()           # names whose first response stops halfway
        self.stall_at = {}              # name -> no byte past this offset is ever sent
        self.ignore_range = False
        self.html = set()               # names answered with an HTML page (200, text/html)
        self.listing_body = None        # bytes to send instead of the API's JSON
        self.listed_commit = COMMIT
        self.requests = []              # (path, Range header) of every request

    def listing(self):
        siblings = []
        for name, data in self.files.items():
            entry = {"rfilename": name, "size": len(data)}
            if name.endswith(".safetensors"):
                pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:"
                           f"{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n").encode()
                entry.update(blobId=git_blob_sha1(pointer),
                             lfs={"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                  "pointerSize": len(pointer)})
            else:
                entry["blobId"] = git_blob_sha1(data)
            siblings.append(entry)
        siblings.append({"rfilename": "onnx/decoder_model.onnx"})   # others: not read
        return {"id": REPO, "sha": self.listed_commit, "siblings": siblings}


def make_handler(hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            hub.requests.append((self.path, self.headers.get("Range")))
            path = self.path.split("?")[0]
            if path in (f"/api/models/{REPO}/revision/{rev}" for rev in (COMMIT, "main")):
                body = hub.listing_body or json.dumps(hub.listing()).encode()
                return self.reply(200, body, "application/json")
            for name in hub.files:
                if path == f"/{REPO}/resolve/{COMMIT}/{name}":
                    if name.endswith(".safetensors"):   # LFS files live on a CDN
                        sha = hashlib.sha256(hub.files[name]).hexdigest()
                        return self.reply(302, b"", "text/plain", Location=f"/cdn/{sha}")
                    return self.send_file(name)
                if path == f"/cdn/{hashlib.sha256(hub.files[name]).hexdigest()}":
                    return self.send_file(name)
            self.reply(404, b"Entry not found", "text/plain")

        def reply(self, status, body, content_type, **headers):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def send_file(self, name):
            if name in hub.html:
                return self.reply(200, HTML, "text/html; charset=utf-8")
            data = hub.served[name]
            start = 0
            requested = self.headers.get("Range")
            if requested and not hub.ignore_range:
                start = int(requested.removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    return self.reply(416, b"", "text/plain",
                                      **{"Content-Range": f"bytes */{len(data)}"})
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            end = len(data)
            if name in hub.cut_once:
                hub.cut_once.discard(name)
                end = start + (len(data) - start) // 2
            if name in hub.stall_at:
                end = min(end, max(start, hub.stall_at[name]))
            self.wfile.write(data[start:end])
            self.close_connection = end < len(data)   # a cut: close before the promised length

    return Handler


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("repo")
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11), seed=0
        ).save_pretrained(folder)
    return {name: (folder / name).read_bytes() for name in download.FILES}


@pytest.fixture
def hub(model_files, monkeypatch):
    """A fake Hub serving ``model_files`` at COMMIT; retries do not wait."""
    monkeypatch.setattr(download, "RETRY_DELAY_S", 0.0, raising=False)
    state = FakeHub(model_files)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def fetch(hub, target, capsys, *extra, revision=COMMIT):
    args = ["download", "gpt2", str(target), "--hub", hub.url, *extra]
    if revision:
        args += ["--revision", revision]
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_refused(status, err, target, *words):
    """One error line (the last), naming what went wrong; DIR holds nothing, not even a
    temporary folder."""
    last = err.strip().splitlines()[-1]
    assert status == 2, err
    assert "Traceback" not in err
    assert last.startswith("minigpt2 download: error: ")
    for word in words:
        assert word in last, last
    assert not target.exists() or list(target.iterdir()) == []


def test_download_fetches_the_commit_and_checks_every_file(hub, model_files, tmp_path, capsys):
    target = tmp_path / "gpt2"
    status, out, err = fetch(hub, target, capsys, revision="main")
    assert status == 0, err
    assert sorted(p.name for p in target.iterdir()) == sorted(download.FILES)
    for name, data in model_files.items():
        assert (target / name).read_bytes() == data
    assert COMMIT in out and "verified" in out
    # "main" was resolved once; every file came from that commit, never from the moving branch
    file_paths = [p for p, _ in hub.requests if "/resolve/" in p]
    assert file_paths and all(f"/resolve/{COMMIT}/" in p for p in file_paths)
    assert "Hub's digests only" in err     # not the pinned commit: said so


def test_a_cut_transfer_resumes_with_a_range_request(hub, model_files, tmp_path, capsys):
    hub.cut_once = {"model.safetensors"}
    status, _, err = fetch(hub, tmp_path / "gpt2", capsys)
    assert status == 0, err
    data = model_files["model.safetensors"]
    assert (tmp_path / "gpt2" / "model.safetensors").read_bytes() == data
    ranges = [r for p, r in hub.requests if p.startswith("/cdn/")]
    assert ranges == [None, f"bytes={len(data) // 2}-"]


def test_a_server_that_ignores_range_is_read_again_from_the_start(hub, model_files, tmp_path,
                                                                 capsys):
    hub.cut_once, hub.ignore_range = {"model.safetensors"}, True
    status, _, err = fetch(hub, tmp_path / "gpt2", capsys)
    assert status == 0, err
    data = model_files["model.safetensors"]
    assert (tmp_path / "gpt2" / "model.safetensors").read_bytes() == data


def test_a_transfer_that_keeps_being_cut_gives_up_in_one_line(hub, tmp_path, capsys):
    hub.stall_at = {"model.safetensors": 1000}
    target = tmp_path / "gpt2"
    status, _, err = fetch(hub, target, capsys)
    assert_refused(status, err, target, "model.safetensors", f"{download.TRIES} tries", "1,000")
    assert len([p for p, _ in hub.requests if p.startswith("/cdn/")]) == download.TRIES


def test_an_html_page_served_with_200_is_refused(hub, tmp_path, capsys):
    hub.html = {"model.safetensors"}
    target = tmp_path / "gpt2"
    status, _, err = fetch(hub, target, capsys)
    assert_refused(status, err, target, "model.safetensors", "HTML")


def test_an_html_body_without_the_html_type_is_refused(hub, model_files, tmp_path, capsys):
    size = len(model_files["config.json"])
    hub.served["config.json"] = HTML.ljust(size, b" ")[:size]
    target = tmp_path / "gpt2"
    status, _, err = fetch(hub, target, capsys)
    assert_refused(status, err, target, "config.json", "mismatch", "HTML")


@pytest.mark.parametrize("name", download.FILES)
def test_a_tampered_file_is_refused_and_deleted(hub, model_files, tmp_path, capsys, name):
    data = bytearray(model_files[name])
    if name == "config.json":
        data[data.index(b" ")] = ord("\t")     # still valid JSON, same config, same size
    else:
        data[-1] ^= 1                          # one bit of the last weight: header still valid
    hub.served[name] = bytes(data)
    target = tmp_path / "gpt2"
    status, _, err = fetch(hub, target, capsys)
    listed = hub.listing()["siblings"]
    expected = next(s.get("lfs", {}).get("sha256") or s["blobId"] for s in listed
                    if s["rfilename"] == name)
    got = (hashlib.sha256(data).hexdigest() if name.endswith(".safetensors")
           else git_blob_sha1(bytes(data)))
    assert_refused(status, err, target, name, "mismatch", expected, got)


def test_a_truncated_file_is_refused(hub, model_files, tmp_path, capsys):
    hub.served["model.safetensors"] = model_files["model.safetensors"][:-100]
    target = tmp_path / "gpt2"
    status, _, err = fetch(hub, target, capsys)
    assert_refused(status, err, target, "model.safetensors", "416", "truncated")


def test_the_pinned_digests_are_checked_too(hub, model_files, tmp_path, capsys, monkeypatch):
    sha = {name: hashlib.sha256(data).hexdigest() for name, data in model_files.items()}
    monkeypatch.setitem(download.PINNED, "gpt2", (COMMIT, dict(sha)))
    status, _, err = fetch(hub, tmp_path / "ok", capsys, revision=None)   # the pinned commit
    assert status == 0, err
    assert "digests only" not in err

    # the Hub lists (and would serve) other weights than the pinned ones: refused before fetching
    monkeypatch.setitem(download.PINNED, "gpt2", (COMMIT, {**sha, "model.safetensors": "ab" * 32}))
    hub.requests.clear()
    target = tmp_path / "listed"
    status, _, err = fetch(hub, target, capsys, revision=None)
    assert_refused(status, err, target, "model.safetensors", "ab" * 32, sha["model.safetensors"])
    assert not [p for p, _ in hub.requests if "/resolve/" in p]

    # the Hub serves a config.json that agrees with its own listing but not with the pin
    monkeypatch.setitem(download.PINNED, "gpt2", (COMMIT, {**sha, "config.json": "cd" * 32}))
    target = tmp_path / "config"
    status, _, err = fetch(hub, target, capsys, revision=None)
    assert_refused(status, err, target, "config.json", "pinned", "cd" * 32, sha["config.json"])


def test_a_listing_that_is_not_the_hubs_is_refused(hub, tmp_path, capsys):
    hub.listing_body = HTML
    target = tmp_path / "gpt2"
    status, _, err = fetch(hub, target, capsys)
    assert_refused(status, err, target, "file listing")


def test_a_listing_of_another_commit_is_refused(hub, tmp_path, capsys):
    hub.listed_commit = "f" * 40
    target = tmp_path / "gpt2"
    status, _, err = fetch(hub, target, capsys)
    assert_refused(status, err, target, "f" * 40, COMMIT)


def test_the_pins_cover_every_model_with_well_formed_digests():
    assert set(download.PINNED) == set(download.REPOS)
    for commit, digests in download.PINNED.values():
        assert len(commit) == 40 and int(commit, 16) >= 0
        assert set(digests) == set(download.FILES)
        assert all(len(d) == 64 and int(d, 16) >= 0 for d in digests.values())


def test_the_command_line_reads_the_hub_from_the_environment(hub, model_files, tmp_path):
    hub.served["model.safetensors"] = model_files["model.safetensors"][:-1] + b"\0"
    target = tmp_path / "gpt2"
    result = run_subprocess("download", "gpt2", target, "--revision", COMMIT,
                            env={**os.environ, "MINIGPT2_HUB_URL": hub.url})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.safetensors: SHA-256 mismatch" in result.stderr.strip().splitlines()[-1]
    assert list(target.iterdir()) == []


def test_check_download_names_an_unreadable_weights_file(model_files, tmp_path):
    (tmp_path / "config.json").write_bytes(model_files["config.json"])
    (tmp_path / "model.safetensors").write_bytes(model_files["model.safetensors"][:50])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        download.check_download(tmp_path)


def test_a_full_disk_is_one_line_and_leaves_nothing(hub, tmp_path, capsys, monkeypatch):
    class FullDisk:
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, chunk):
            raise OSError(28, "No space left on device")

        def __getattr__(self, attribute):
            return getattr(self.f, attribute)

    monkeypatch.setattr(download, "open", FullDisk, raising=False)
    target = tmp_path / "gpt2"
    status, _, err = fetch(hub, target, capsys)
    assert_refused(status, err, target, "config.json", "No space left on device", "cannot write")


def test_a_broken_tls_read_is_retried_not_blamed_on_the_disk(tmp_path, monkeypatch):
    """An error raised while reading (here a TLS connection cut mid-file, an OSError like a
    full disk's) is a cut transfer: resumed, not reported as a write failure."""
    import email.message
    import ssl

    data = bytes(range(256)) * 8

    class Response:
        """What urlopen returns, reading ``items`` in turn (an exception is raised)."""

        def __init__(self, status, items, content_range=None):
            self.status, self.items = status, list(items)
            self.headers = email.message.Message()
            self.headers["Content-Type"] = "application/octet-stream"
            if content_range:
                self.headers["Content-Range"] = content_range

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            item = self.items.pop(0) if self.items else b""
            if isinstance(item, Exception):
                raise item
            return item

    asked = []

    def fake_open(what, url, headers=None):
        asked.append((headers or {}).get("Range"))
        if len(asked) == 1:
            return Response(200, [data[:100], ssl.SSLEOFError(8, "EOF in violation of protocol")])
        return Response(206, [data[100:]], f"bytes 100-{len(data) - 1}/{len(data)}")

    monkeypatch.setattr(download, "_open", fake_open)
    monkeypatch.setattr(download, "RETRY_DELAY_S", 0.0, raising=False)
    download.fetch_verified("https://hub.invalid/x", tmp_path / "x.bin", size=len(data),
                            kind="sha256", digest=hashlib.sha256(data).hexdigest())
    assert (tmp_path / "x.bin").read_bytes() == data
    assert asked == [None, "bytes=100-"]


def test_a_revision_without_the_weights_is_named(hub, tmp_path, capsys):
    del hub.files["model.safetensors"]
    target = tmp_path / "gpt2"
    status, _, err = fetch(hub, target, capsys)
    assert_refused(status, err, target, "has no model.safetensors", COMMIT)
