"""Document readers: .jsonl (.gz, .zst), .txt, .parquet files or a folder of them, streamed shard by shard.

Rules (what a user can rely on):

* ``.jsonl``: one JSON object per line with a string field ``text`` and an optional ``id`` (string or
  integer, kept as a string). Blank lines are skipped. Default id: ``"{name}:{line}"`` (1-based line).
* ``.jsonl.gz`` / ``.jsonl.zst``: the same, gzip- or zstandard-compressed (several concatenated
  gzip members / zstd frames are read as one stream). Lines, and byte offsets in messages, count in
  the decompressed stream. A truncated or corrupt stream is an error, never a silently shorter corpus.
* ``.txt``: a file is split into documents at blank lines (one or more lines holding only whitespace).
  A file without blank lines is therefore one document. Lines inside a document are joined with
  ``"\\n"`` (line endings normalised; a line ends where ``str.splitlines`` ends one). Default id:
  ``"{name}:{line}"`` where line is the 1-based number of the document's first line.
* ``.parquet``: a string column ``text`` and an optional ``id`` column (string or integer). Default
  id: ``"{name}:{row}"`` (1-based row); errors name the row as ``file:row N``.
* A folder: every ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, ``.txt`` and ``.parquet`` file below it
  (recursive, sorted by relative path; hidden files/folders and other extensions are ignored). Each file
  is a shard. ``name`` in the default ids is the path relative to the folder (without the extension
  (.jsonl, .jsonl.gz, .jsonl.zst, .parquet), with it for .txt); for a single file it is the file name
  without that extension (.txt: the file name).
* Documents whose text is empty after strip() are skipped; a corpus with no document left is an
  error. Two documents with the same id are an error (ids must identify documents downstream):
  `read_documents` checks that in RAM; `hiermem prepare` checks it on disk (data/shards.py).

Every problem raises HiermemError with one line naming the file and, where it applies, the line/row.

Streaming: `list_shards` names the shards, `iter_records` yields one shard's documents with where they
lie (byte offset and length of the line or block in the decompressed stream; the row for .parquet), and
`read_raw` + `decode_raw` read documents back from those positions (data/shards.py keeps them).
Memory is bounded by the largest line (a parquet batch of 4096 rows), not by the corpus. A .txt file is read
in pieces that end at b"\n", so one whose lines all end in "\r" is held whole while it is read.
"""

from __future__ import annotations

import contextlib
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from hiermem.errors import HiermemError

# suffix -> format; compound suffixes first (they are matched on the lower-cased file name)
FORMATS = {".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst", ".jsonl": "jsonl", ".txt": "txt",
           ".parquet": "parquet"}
_EXPECTED = "expected .jsonl, .jsonl.gz, .jsonl.zst, .txt, .parquet or a folder"
_BOM = b"\xef\xbb\xbf"
PARQUET_BATCH = 4096


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class Shard:
    """One corpus file: its path, the name its default ids start with, and its format (a FORMATS value)."""
    path: Path
    name: str
    fmt: str


@dataclass(frozen=True)
class Record:
    """A document and where it lies in its shard."""
    doc: Document
    loc: str  # "file:line" or "file:row N", as messages name it
    line: int  # 1-based line (.txt: the document's first line); .parquet: 1-based row
    offset: int  # byte offset in the decompressed stream (after a BOM); .parquet: 0-based row
    length: int  # bytes (the line with its ending; .txt: the block's lines); .parquet: 1


def format_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return fmt
    return None


def _strip_suffix(name: str, fmt: str) -> str:
    """The default-id name: without the format's extension (.txt keeps it)."""
    if fmt == "txt":
        return name
    suffix = next(s for s, f in FORMATS.items() if f == fmt)
    return name[: -len(suffix)]


def list_shards(path: str | Path) -> list[Shard]:
    """The shards of a file or folder (see the module docstring), in corpus order."""
    path = Path(path)
    if not path.exists():
        raise HiermemError(f"{path}: no such file or directory")
    if path.is_dir():
        shards = []
        for f in _folder_files(path):
            fmt = format_of(f)
            shards.append(Shard(f, _strip_suffix(f.relative_to(path).as_posix(), fmt), fmt))
        return shards
    fmt = format_of(path)
    if fmt is None:
        kind = f'"{path.suffix}"' if path.suffix else "(no extension)"
        raise HiermemError(f"{path}: unsupported file type {kind} ({_EXPECTED})")
    return [Shard(path, _strip_suffix(path.name, fmt), fmt)]


def _folder_files(folder: Path) -> list[Path]:
    def visible(p: Path) -> bool:
        return not any(part.startswith(".") for part in p.relative_to(folder).parts)

    files = [p for p in folder.rglob("*") if p.is_file() and format_of(p) and visible(p)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def read_documents(path: str | Path) -> list[Document]:
    """Every document of a file or folder in RAM (small data, tests); `hiermem prepare` streams instead."""
    path = Path(path)
    docs: list[Document] = []
    where: dict[str, str] = {}  # id -> location of its first occurrence
    for shard in list_shards(path):
        for rec in iter_records(shard):
            if rec.doc.id in where:
                raise HiermemError(f"{rec.loc}: duplicate id {quote_id(rec.doc.id)} (first seen at {where[rec.doc.id]})")
            where[rec.doc.id] = rec.loc
            docs.append(rec.doc)
    if not docs:
        raise HiermemError(f"{path}: no documents (empty corpus)")
    return docs


def quote_id(doc_id: str) -> str:
    """An id in a message: JSON-quoted, so one holding a quote or a line break keeps the message one line."""
    return json.dumps(doc_id, ensure_ascii=False)


def iter_records(shard: Shard) -> Iterator[Record]:
    """A shard's documents with a non-blank text, in file order (streamed; ids are not checked for repeats)."""
    if shard.fmt == "txt":
        records = _iter_txt(shard)
    elif shard.fmt == "parquet":
        records = _iter_parquet(shard)
    else:
        records = _iter_jsonl(shard)
    for rec in records:
        if rec.doc.text.strip():
            yield rec


# --- opening (decompressing) streams ------------------------------------------------------------------


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise HiermemError(f"{path}: cannot read ({e.strerror or e})") from None


class _Truncated(Exception):
    pass


class _ZstdRaw(io.RawIOBase):
    """Decompressed bytes of a zstd file (any number of frames). Unlike zstandard's stream_reader it
    raises on a stream cut inside a frame instead of ending early."""

    def __init__(self, f: BinaryIO):
        import zstandard

        self._f = f
        self._dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        self._obj = None  # decoder of the current frame; None between frames
        self._input = b""  # compressed bytes not yet decoded
        self._out = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._out:
            if not self._input:
                self._input = self._f.read(1 << 16)
                if not self._input:
                    if self._obj is not None:
                        raise _Truncated("the stream ends inside a zstd frame")
                    return 0
            if self._obj is None:
                self._obj = self._dctx.decompressobj()
            data, self._input = self._input, b""
            self._out = self._obj.decompress(data)
            if self._obj.eof:
                self._input, self._obj = self._obj.unused_data, None
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _stream_errors(fmt: str) -> tuple[type[BaseException], ...]:
    errors: tuple = (OSError, EOFError, _Truncated)
    if fmt == "jsonl.gz":
        errors += (zlib.error,)
    if fmt == "jsonl.zst":
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


@contextlib.contextmanager
def _open_stream(shard: Shard) -> Iterator[BinaryIO]:
    """The shard's (decompressed) bytes as a buffered binary stream."""
    f = _open(shard.path)
    with contextlib.ExitStack() as stack:
        stack.callback(f.close)
        if shard.fmt == "jsonl.gz":
            import gzip

            yield stack.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))
        elif shard.fmt == "jsonl.zst":
            yield stack.enter_context(io.BufferedReader(_ZstdRaw(f), 1 << 16))
        else:
            yield f


def _what(fmt: str) -> str:
    return {"jsonl.gz": "gzip data", "jsonl.zst": "zstd data"}.get(fmt, "file")


def _lines(stream: BinaryIO, shard: Shard) -> Iterator[bytes]:
    """The stream's lines (b"\\n"-terminated), read errors and corrupt compressed data as one-line errors."""
    errors = _stream_errors(shard.fmt)
    it = iter(stream)
    n = 0
    while True:
        try:
            raw = next(it)
        except StopIteration:
            return
        except errors as e:
            where = f" after line {n}" if n else ""
            raise HiermemError(f"{shard.path}: corrupt or truncated {_what(shard.fmt)}{where} "
                               f"({_first_line(e)})") from None
        n += 1
        yield raw


def _decode(raw: bytes, path: Path, offset: int, line: int) -> str:
    """Decode UTF-8; on failure name the line and the absolute byte offset in the file."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HiermemError(f"{path}:{line}: invalid UTF-8 at byte {offset + e.start}") from None


# --- scanning -------------------------------------------------------------------------------------------


def _iter_jsonl(shard: Shard) -> Iterator[Record]:
    path = shard.path
    offset = 0
    with _open_stream(shard) as stream:
        for lineno, raw in enumerate(_lines(stream, shard), start=1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(_BOM):  # tolerate a UTF-8 BOM
                raw, start = raw[3:], start + 3
            line = _decode(raw, path, start, lineno)
            if not line.strip():
                continue
            loc = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise HiermemError(f"{loc}: malformed JSON ({e.msg})") from None
            except ValueError as e:  # a number too long for int() (Python's 4300-digit limit)
                raise HiermemError(f"{loc}: malformed JSON ({_first_line(e).split(':')[0]})") from None
            except RecursionError:
                raise HiermemError(f"{loc}: malformed JSON (nested too deeply)") from None
            if not isinstance(obj, dict):
                raise HiermemError(f"{loc}: expected a JSON object, got {type(obj).__name__}")
            if "text" not in obj:
                raise HiermemError(f'{loc}: missing field "text"')
            doc = Document(_doc_id(obj.get("id"), loc, f"{shard.name}:{lineno}"), _text(obj["text"], loc))
            yield Record(doc, loc, lineno, start, len(raw))


def _nbytes(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8"))


def _iter_txt(shard: Shard) -> Iterator[Record]:
    """Line by line. Binary lines end at b"\\n", which no UTF-8 sequence contains and which ends every
    str.splitlines line ending it belongs to, so splitting each binary line with splitlines gives the
    lines (and numbers) of splitlines over the whole file."""
    path = shard.path
    block: list[str] = []
    first = start = end = 0
    lineno = 0
    pos = 0  # byte offset of the next binary line
    with _open_stream(shard) as stream:
        for i, raw in enumerate(_lines(stream, shard)):
            base, pos = pos, pos + len(raw)
            if i == 0 and raw.startswith(_BOM):
                raw, base = raw[3:], base + 3
            text = _decode_txt(raw, path, base, lineno)
            for line, piece in zip(text.splitlines(), text.splitlines(keepends=True)):
                lineno += 1
                if line.strip():
                    if not block:
                        first, start = lineno, base
                    block.append(line)
                    end = base + _nbytes(piece)
                elif block:
                    yield Record(Document(f"{shard.name}:{first}", "\n".join(block)), f"{path}:{first}", first,
                                 start, end - start)
                    block = []
                base += _nbytes(piece)
    if block:
        yield Record(Document(f"{shard.name}:{first}", "\n".join(block)), f"{path}:{first}", first, start,
                     end - start)


def _decode_txt(raw: bytes, path: Path, offset: int, lines_before: int) -> str:
    """_decode for a binary .txt line (which may hold several splitlines lines): a failure names the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        head = raw[: e.start].decode("utf-8").splitlines(keepends=True)
        ended = bool(head) and head[-1].splitlines()[0] != head[-1]  # the bad byte starts a new line
        line = lines_before + len(head) + (1 if ended or not head else 0)
        raise HiermemError(f"{path}:{line}: invalid UTF-8 at byte {offset + e.start}") from None


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _open(path).close()  # same "cannot read" message as the other formats
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise HiermemError(f"{path}: not a valid parquet file ({_first_line(e)})") from None


def _iter_parquet(shard: Shard) -> Iterator[Record]:
    import pyarrow as pa

    path = shard.path
    pf = _parquet_file(path)
    columns = pf.schema_arrow.names
    if "text" not in columns:
        raise HiermemError(f'{path}: missing column "text"')
    wanted = ["text"] + (["id"] if "id" in columns else [])
    row = 0
    try:
        batches = pf.iter_batches(columns=wanted, batch_size=PARQUET_BATCH)  # stream: bounded memory
        for batch in batches:
            texts = batch.column("text").to_pylist()
            ids = batch.column("id").to_pylist() if "id" in wanted else [None] * len(texts)
            for text, doc_id in zip(texts, ids):
                row += 1
                loc = f"{path}:row {row}"
                yield Record(Document(_doc_id(doc_id, loc, f"{shard.name}:{row}"), _text(text, loc)), loc, row,
                             row - 1, 1)
    except pa.ArrowException as e:
        raise HiermemError(f"{path}: cannot read parquet data ({_first_line(e)})") from None


def _text(value: object, loc: str) -> str:
    if not isinstance(value, str):
        raise HiermemError(f'{loc}: field "text" must be a string')
    return _unicode(value, "text", loc)


def _doc_id(value: object, loc: str, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise HiermemError(f'{loc}: field "id" must be a string or an integer')
    return _unicode(value, "id", loc) if isinstance(value, str) else str(value)


def _unicode(value: str, name: str, loc: str) -> str:
    """A string that UTF-8 can encode: JSON's \\ud800 escapes decode to lone surrogates, which the tokenizer
    and the on-disk index cannot take."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise HiermemError(f'{loc}: field "{name}" holds an unpaired surrogate '
                               f'(\\u{ord(value[e.start]):04x}) at character {e.start}') from None
    return value


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# --- reading documents back from their positions ------------------------------------------------------


def read_raw(shard: Shard, positions: Iterable[tuple[int, int]]) -> Iterator[bytes | str]:
    """The raw records at (offset, length) positions from iter_records, in ascending offset order, one
    open stream for all (a compressed shard is decompressed once, up to the last position): bytes for
    the line formats (decode_raw turns them into the text), the text itself for .parquet."""
    if shard.fmt == "parquet":
        yield from _parquet_rows(shard, (off for off, _ in positions))
        return
    path = shard.path
    errors = _stream_errors(shard.fmt)
    with _open_stream(shard) as stream:
        pos = 0
        for off, length in positions:
            try:
                if off != pos:
                    if off < pos:
                        raise ValueError(f"{path}: positions must ascend ({off} after {pos})")
                    if shard.fmt == "jsonl" or shard.fmt == "txt":
                        stream.seek(off)
                    else:
                        _skip(stream, off - pos)
                raw = stream.read(length)
            except errors as e:
                raise HiermemError(f"{path}: cannot read at byte {off} ({_first_line(e)})") from None
            if len(raw) != length:
                raise HiermemError(f"{path}: ends before byte {off + length} (changed since it was indexed?)")
            pos = off + length
            yield raw


def _skip(stream: BinaryIO, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise EOFError("unexpected end of stream")
        n -= len(chunk)


def decode_raw(fmt: str, raw: bytes | str) -> str:
    """A document's text from its raw record (see read_raw)."""
    if fmt == "parquet":
        return raw
    text = raw.decode("utf-8")
    if fmt == "txt":
        return "\n".join(text.splitlines())
    return json.loads(text)["text"]


def _parquet_rows(shard: Shard, rows: Iterable[int]) -> Iterator[str]:
    """The texts of 0-based rows (ascending), reading only the row groups that hold them."""
    import numpy as np
    import pyarrow as pa

    pf = _parquet_file(shard.path)
    md = pf.metadata
    ends = np.cumsum([md.row_group(g).num_rows for g in range(md.num_row_groups)], dtype=np.int64)
    it = iter(rows)
    row = next(it, None)
    try:
        while row is not None:
            g = int(np.searchsorted(ends, row, side="right"))
            if g >= len(ends):
                raise HiermemError(f"{shard.path}: has no row {row + 1} (changed since it was indexed?)")
            base = int(ends[g - 1]) if g else 0
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=[g], columns=["text"]):
                col = batch.column(0)
                stop = base + len(col)
                local = []
                while row is not None and row < stop:
                    local.append(row - base)
                    row = next(it, None)
                if local:
                    yield from (col if len(local) == len(col) and local[-1] == len(col) - 1 and local[0] == 0
                                else col.take(pa.array(local, pa.int64()))).to_pylist()
                base = stop
                if row is None or row >= int(ends[g]):
                    break
    except pa.ArrowException as e:
        raise HiermemError(f"{shard.path}: cannot read parquet data ({_first_line(e)})") from None
