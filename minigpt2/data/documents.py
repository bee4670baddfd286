"""The documents of a corpus, read as a stream of pieces: ``prepare``'s input side.

Inputs, in the order given (a folder: its files in sorted path order, subfolders included):
    *.txt                   a file is a document (UTF-8)
    *.jsonl, *.jsonl.gz     a line is a document: its ``text_field`` (default "text")
    hf:NAME                 a Hugging Face dataset, streamed with the ``datasets`` package
                            (``hf_subset``, ``hf_split``; needs the package and a connection)

A document longer than ``piece_chars`` characters is cut into pieces at safe places
(``token_files.cut_pieces``), so memory stays bounded by the piece size, whatever the document's
length. Pieces before a resume point come with text None: an earlier run wrote them.
"""

from __future__ import annotations

import codecs
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from .token_files import cut_pieces

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
PIECE_CHARS = 1 << 20          # characters per piece, and per task sent to a worker


@dataclass
class Source:
    """One input: a .txt file, a .jsonl(.gz) file, or a Hugging Face dataset (kind "hf")."""

    kind: str                   # "txt" | "jsonl" | "jsonl.gz" | "hf"
    name: str                   # the path, or the dataset name
    size: int | None = None     # bytes on disk (None for a dataset)
    mtime_ns: int | None = None

    def record(self) -> list:
        return [self.kind, self.name, self.size, self.mtime_ns]


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in (".jsonl.gz", ".jsonl", ".txt"):
        if name.endswith(suffix):
            return suffix[1:]
    return None


def _file_source(path: Path) -> Source:
    st = path.stat()
    return Source(_kind(path), str(path.resolve()), st.st_size, st.st_mtime_ns)


def resolve_inputs(inputs, exclude=None) -> list[Source]:
    """INPUT arguments -> the sources, in order (a folder's files sorted by path; files inside
    the folder ``exclude``, the output, are left out)."""
    exclude = Path(exclude).resolve() if exclude is not None else None
    if not inputs:
        raise ValueError("give at least one INPUT: a .txt/.jsonl/.jsonl.gz file, a folder of "
                         "them, or hf:NAME")
    sources = []
    for item in inputs:
        item = str(item)
        if item.startswith("hf:"):
            if not item[3:]:
                raise ValueError("hf: needs a dataset name, e.g. hf:HuggingFaceFW/fineweb-edu")
            _datasets_module()                      # say at once when the package is missing
            sources.append(Source("hf", item[3:]))
            continue
        path = Path(item)
        if path.is_dir() and exclude is not None and path.resolve().is_relative_to(exclude):
            raise ValueError(f"input {path} is the --out folder {exclude} (or inside it): the "
                             "shards would be written among the inputs; give --out a folder "
                             "of its own (it may lie inside the input folder)")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p)
                           and not (exclude and p.resolve().is_relative_to(exclude)))
            if not files:
                raise FileNotFoundError(f"the folder {path} holds no {', '.join(SUFFIXES)} "
                                        "files")
            sources += [_file_source(p) for p in files]
        elif path.is_file():
            if _kind(path) is None:
                raise ValueError(f"{path}: unsupported input; give .txt, .jsonl or .jsonl.gz "
                                 "files, folders of them, or hf:NAME")
            sources.append(_file_source(path))
        else:
            raise FileNotFoundError(f"input {path}: no such file or folder")
    return sources


@dataclass
class Piece:
    """A piece of a document: ``text`` None means "skipped" (already encoded, when resuming)."""

    doc: int                    # document index in the whole input
    index: int                  # piece index in the document
    text: str | None
    nbytes: int                 # input bytes this piece accounts for (progress)


def _decode_blocks(path: str, f, block_bytes: int):
    """UTF-8 text of a binary file, block by block (a character may span two blocks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    while True:
        raw = f.read(block_bytes)
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} near byte "
                             f"{offset + e.start}); convert it to UTF-8 first") from None
        offset += len(raw)
        if text:
            yield text
        if not raw:
            return


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _txt_pieces(source: Source, doc: int, start, piece_chars: int):
    if doc < start[0]:                       # done in an earlier run: not even read
        yield Piece(doc, 0, None, source.size)
        return
    with open(source.name, "rb") as f:
        for k, text in enumerate(cut_pieces(_decode_blocks(source.name, f, piece_chars),
                                             piece_chars)):
            skipped = doc == start[0] and k < start[1]
            yield Piece(doc, k, None if skipped else text, _utf8_len(text))


def _record_text(where: str, obj, field: str) -> str:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object {{...}}, got {type(obj).__name__}")
    if field not in obj:
        raise ValueError(f"{where}: no field {field!r} (name the text's field with "
                         "--text-field)")
    text = obj[field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got "
                         f"{type(text).__name__}")
    return text


def _jsonl_pieces(source: Source, first_doc: int, start, field: str, piece_chars: int):
    """Pieces of every non-blank line's document. Lines before the resume point are counted,
    not parsed."""
    raw = open(source.name, "rb")
    try:
        f = gzip.open(raw) if source.kind == "jsonl.gz" else raw
        doc, pending, pos = first_doc, 0, 0
        try:
            for lineno, line in enumerate(f, 1):
                now = raw.tell()
                pending, pos = pending + now - pos, now
                if not line.strip():
                    continue
                if doc < start[0]:
                    yield Piece(doc, 0, None, pending)
                else:
                    try:
                        obj = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise ValueError(f"{source.name}:{lineno}: not a JSON line ({e}); each "
                                         "line must be one JSON object") from None
                    text = _record_text(f"{source.name}:{lineno}", obj, field)
                    for k, piece in enumerate(cut_pieces([text], piece_chars)):
                        skipped = doc == start[0] and k < start[1]
                        yield Piece(doc, k, None if skipped else piece, pending if k == 0 else 0)
                doc, pending = doc + 1, 0
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ValueError(f"{source.name}: cannot read it ({e})") from None
        if pending:
            yield Piece(doc - 1, -1, None, pending)    # trailing blank lines: progress only
    finally:
        raw.close()


def _datasets_module():
    try:
        import datasets
    except ImportError:
        raise RuntimeError("hf:NAME inputs need the 'datasets' package: pip install datasets "
                           "(and a connection to the Hugging Face Hub)") from None
    return datasets


def _hf_dataset(source: Source, subset, split):
    datasets = _datasets_module()
    try:
        return datasets.load_dataset(source.name, subset, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - network, name or split errors: one line
        raise RuntimeError(f"cannot open the dataset hf:{source.name} (subset {subset}, split "
                           f"{split}): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           ) from None


def _hf_pieces(source: Source, first_doc: int, start, field: str, piece_chars: int,
               subset, split):
    ds = _hf_dataset(source, subset, split)
    skip = max(0, start[0] - first_doc)
    if skip:
        ds = ds.skip(skip)                   # resumed: the documents already written
    for doc, record in enumerate(ds, first_doc + skip):
        text = _record_text(f"hf:{source.name} record {doc - first_doc}", record, field)
        for k, piece in enumerate(cut_pieces([text], piece_chars)):
            skipped = doc == start[0] and k < start[1]
            yield Piece(doc, k, None if skipped else piece, _utf8_len(piece))


def iter_pieces(sources, text_field="text", piece_chars=PIECE_CHARS, start=(0, 0),
                hf_subset=None, hf_split="train"):
    """Every piece of every document of ``sources``, in order. Pieces before ``start``
    (document, piece) come with text None: they were written by an earlier run."""
    doc = 0
    for source in sources:
        last = doc - 1
        if source.kind == "txt":
            gen = _txt_pieces(source, doc, start, piece_chars)
        elif source.kind == "hf":
            gen = _hf_pieces(source, doc, start, text_field, piece_chars, hf_subset, hf_split)
        else:
            gen = _jsonl_pieces(source, doc, start, text_field, piece_chars)
        for piece in gen:
            last = max(last, piece.doc)
            yield piece
        doc = last + 1


