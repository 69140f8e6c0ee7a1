"""Document readers: .jsonl, .txt, .parquet files or a folder of them -> a list of Documents.

Rules (what a user can rely on):

* ``.jsonl``: one JSON object per line with a string field ``text`` and an optional ``id`` (string or
  integer, kept as a string). Blank lines are skipped. Default id: ``"{name}:{line}"`` (1-based line).
* ``.txt``: a file is split into documents at blank lines (one or more lines holding only whitespace).
  A file without blank lines is therefore one document. Lines inside a document are joined with
  ``"\\n"`` (line endings normalised). Default id: ``"{name}:{line}"`` where line is the 1-based
  number of the document's first line.
* ``.parquet``: a string column ``text`` and an optional ``id`` column (string or integer). Default
  id: ``"{name}:{row}"`` (1-based row); errors name the row as ``file:row N``.
* A folder: every ``.jsonl``, ``.txt`` and ``.parquet`` file below it (recursive, sorted by relative
  path; hidden files/folders and other extensions are ignored). ``name`` in the default ids is the
  path relative to the folder (without the extension for .jsonl/.parquet, with it for .txt); for a
  single file it is the file stem (.jsonl/.parquet) or the file name (.txt).
* Documents whose text is empty after strip() are skipped; a corpus with no document left is an
  error. Two documents with the same id are an error (ids must identify documents downstream).

Every problem raises HiermemError with one line naming the file and, where it applies, the line/row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hiermem.errors import HiermemError

SUPPORTED = (".jsonl", ".txt", ".parquet")
_EXPECTED = "expected .jsonl, .txt, .parquet or a folder"


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def read_documents(path: str | Path) -> list[Document]:
    """Read every document of a file or folder (see the module docstring for the rules)."""
    path = Path(path)
    docs: list[Document] = []
    where: dict[str, str] = {}  # id -> location of its first occurrence
    for doc, loc in _iter_path(path):
        if not doc.text.strip():
            continue
        if doc.id in where:
            raise HiermemError(f'{loc}: duplicate id "{doc.id}" (first seen at {where[doc.id]})')
        where[doc.id] = loc
        docs.append(doc)
    if not docs:
        raise HiermemError(f"{path}: no documents (empty corpus)")
    return docs


def _iter_path(path: Path) -> Iterator[tuple[Document, str]]:
    if not path.exists():
        raise HiermemError(f"{path}: no such file or directory")
    if path.is_dir():
        for f in _folder_files(path):
            rel = f.relative_to(path)
            name = rel.as_posix() if f.suffix.lower() == ".txt" else rel.with_suffix("").as_posix()
            yield from _iter_file(f, name)
        return
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        kind = f'"{path.suffix}"' if path.suffix else "(no extension)"
        raise HiermemError(f"{path}: unsupported file type {kind} ({_EXPECTED})")
    yield from _iter_file(path, path.name if suffix == ".txt" else path.stem)


def _folder_files(folder: Path) -> list[Path]:
    def visible(p: Path) -> bool:
        return not any(part.startswith(".") for part in p.relative_to(folder).parts)

    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED and visible(p)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _iter_file(path: Path, name: str) -> Iterator[tuple[Document, str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _iter_jsonl(path, name)
    if suffix == ".txt":
        return _iter_txt(path, name)
    return _iter_parquet(path, name)


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise HiermemError(f"{path}: cannot read ({e.strerror or e})") from None


def _decode(raw: bytes, path: Path, offset: int, line: int | None) -> str:
    """Decode UTF-8; on failure name the absolute byte offset in the file (and the line if known)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        loc = f"{path}:{line}" if line is not None else f"{path}"
        raise HiermemError(f"{loc}: invalid UTF-8 at byte {offset + e.start}") from None


def _iter_jsonl(path: Path, name: str) -> Iterator[tuple[Document, str]]:
    offset = 0
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 BOM
                raw, start = raw[3:], start + 3
            line = _decode(raw, path, start, lineno)
            if not line.strip():
                continue
            loc = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise HiermemError(f"{loc}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise HiermemError(f"{loc}: expected a JSON object, got {type(obj).__name__}")
            if "text" not in obj:
                raise HiermemError(f'{loc}: missing field "text"')
            yield Document(_doc_id(obj.get("id"), loc, f"{name}:{lineno}"), _text(obj["text"], loc)), loc


def _iter_txt(path: Path, name: str) -> Iterator[tuple[Document, str]]:
    with _open(path) as f:
        raw = f.read()
    start = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    text = _decode(raw[start:], path, start, None)
    block: list[str] = []
    first = 0
    # A trailing "" sentinel flushes the last block.
    for lineno, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            if not block:
                first = lineno
            block.append(line)
        elif block:
            yield Document(f"{name}:{first}", "\n".join(block)), f"{path}:{first}"
            block = []


def _iter_parquet(path: Path, name: str) -> Iterator[tuple[Document, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _open(path).close()  # same "cannot read" message as the other formats
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise HiermemError(f"{path}: not a valid parquet file ({_first_line(e)})") from None
    columns = pf.schema_arrow.names
    if "text" not in columns:
        raise HiermemError(f'{path}: missing column "text"')
    wanted = ["text"] + (["id"] if "id" in columns else [])
    row = 0
    try:
        batches = pf.iter_batches(columns=wanted, batch_size=4096)  # stream: bounded memory
        for batch in batches:
            texts = batch.column("text").to_pylist()
            ids = batch.column("id").to_pylist() if "id" in wanted else [None] * len(texts)
            for text, doc_id in zip(texts, ids):
                row += 1
                loc = f"{path}:row {row}"
                yield Document(_doc_id(doc_id, loc, f"{name}:{row}"), _text(text, loc)), loc
    except pa.ArrowException as e:
        raise HiermemError(f"{path}: cannot read parquet data ({_first_line(e)})") from None


def _text(value: object, loc: str) -> str:
    if not isinstance(value, str):
        raise HiermemError(f'{loc}: field "text" must be a string')
    return value


def _doc_id(value: object, loc: str, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise HiermemError(f'{loc}: field "id" must be a string or an integer')
    return str(value)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
