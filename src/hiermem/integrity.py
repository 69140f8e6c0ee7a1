"""Checksums of the files hiermem writes, so that a damaged file is refused when loaded, never used.

Three ways a file carries its checksum, chosen by what the file is:
* a JSON file seals itself: the key SEAL holds the crc32 of the rest of the object (canonical JSON). A file
  without the key (written by an older hiermem, or by hand) is read as before;
* a file whose format has no room for a checksum (tokenizer.json, config.yaml, .npy, .npz) is listed in
  CHECKSUMS (.checksums.json), a sealed JSON file in its folder: name -> size and crc32, updated atomically
  after the file is written. A file not listed there is read unchecked (an older hiermem's, or a user's own);
* formats with metadata of their own keep their checksums there (safetensors metadata, the bank's block
  tables, a checkpoint's state.json, cluster.json).
check_file verifies the size always and the crc32 when asked (a file read whole anyway, or small); hiermem
verify checks everything in full.
"""

from __future__ import annotations

import fcntl
import json
import os
import zlib
from pathlib import Path
from typing import Any

from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_json

SEAL = "json_crc32"  # the key of a sealed JSON object
CHECKSUMS = ".checksums.json"  # hidden: a folder lists as it did
READ_BYTES = 1 << 20  # a file is checksummed through one buffer of this size (memory does not grow with it)
FULL_CHECK_BYTES = 1 << 30  # caches at most this big are checksummed in full when opened (else: size only)


def crc32_bytes(data: bytes | memoryview, value: int = 0) -> int:
    return zlib.crc32(data, value)


def crc32_file(path: Path) -> int:
    crc, buf = 0, bytearray(READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


# -- sealed JSON --------------------------------------------------------------------------------------------
def _canonical(obj: dict) -> bytes:
    return json.dumps({k: v for k, v in obj.items() if k != SEAL}, sort_keys=True, separators=(",", ":")).encode()


def seal(obj: dict) -> dict:
    """obj with SEAL set to the crc32 of the rest of it (an old seal is replaced)."""
    return {**{k: v for k, v in obj.items() if k != SEAL}, SEAL: zlib.crc32(_canonical(obj))}


def unseal(path: Path, obj: Any) -> Any:
    """obj without its seal, once the seal is checked; an object without one is returned as it is."""
    if not isinstance(obj, dict) or SEAL not in obj:
        return obj
    if obj[SEAL] != zlib.crc32(_canonical(obj)):
        raise HiermemError(f"{path}: corrupted (checksum mismatch)")
    return {k: v for k, v in obj.items() if k != SEAL}


def write_sealed_json(path: str | os.PathLike, obj: dict) -> None:
    atomic_write_json(path, seal(obj))


def read_json(path: str | os.PathLike, what: str = "file", check_seal: bool = True) -> Any:
    """A JSON file, its seal checked (unless check_seal is False: then as it is, seal included): a missing,
    unreadable or damaged file is a one-line HiermemError."""
    path = Path(path)
    if not path.is_file():
        raise HiermemError(f"{path}: missing ({what})")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HiermemError(f"{path}: corrupted or unreadable {what} ({type(e).__name__}: "
                           f"{' '.join(str(e).split())})") from None
    return unseal(path, obj) if check_seal else obj


# -- a folder's checksum list -------------------------------------------------------------------------------
def _listing(folder: Path) -> dict[str, dict]:
    path = folder / CHECKSUMS
    if not path.is_file():
        return {}
    files = read_json(path, "checksum list")
    if not isinstance(files, dict) or not isinstance(files.get("files"), dict):
        raise HiermemError(f"{path}: corrupted checksum list (no files)")
    return files["files"]


def record(*paths: str | os.PathLike) -> None:
    """List the files (just written, complete) with their size and crc32 in their folders' CHECKSUMS."""
    by_folder: dict[Path, list[Path]] = {}
    for p in map(Path, paths):
        by_folder.setdefault(p.parent, []).append(p)
    for folder, files in by_folder.items():
        lock_fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)  # flock on the folder itself: no lock file
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)  # two writers in one folder must not lose each other's entries
            listing = _listing(folder)
            for p in files:
                listing[p.name] = {"size": p.stat().st_size, "crc32": crc32_file(p)}
            write_sealed_json(folder / CHECKSUMS, {"files": dict(sorted(listing.items()))})
        finally:
            os.close(lock_fd)


def recorded(path: str | os.PathLike) -> dict | None:
    """The size and crc32 listed for path in its folder's CHECKSUMS (None: not listed)."""
    path = Path(path)
    entry = _listing(path.parent).get(path.name)
    return entry if isinstance(entry, dict) else None


def check_file(path: str | os.PathLike, what: str = "file", full: bool = True, entry: dict | None = None) -> None:
    """A missing file, or one whose size (and with full, crc32) differs from what was recorded at write time
    (entry, else its folder's CHECKSUMS), is a HiermemError naming it; an unrecorded file passes."""
    path = Path(path)
    if not path.is_file():
        raise HiermemError(f"{path}: missing ({what})")
    entry = recorded(path) if entry is None else entry
    if entry is None:
        return
    size = path.stat().st_size
    if size != entry.get("size", size):
        raise HiermemError(f"{path}: corrupted {what} ({size} bytes, {entry['size']} when written: truncated?)")
    if full and crc32_file(path) != entry.get("crc32"):
        raise HiermemError(f"{path}: corrupted {what} (checksum mismatch)")


def entry_of(path: str | os.PathLike) -> dict:
    """The size and crc32 of a file, as check_file's entry (kept in some other file's metadata)."""
    path = Path(path)
    return {"size": path.stat().st_size, "crc32": crc32_file(path)}


def check_files(paths, what: str, full: bool | None = None) -> None:
    """check_file for each path; full=None: in full when together they are at most FULL_CHECK_BYTES, else
    their sizes only (the rest is for hiermem verify)."""
    paths = [Path(p) for p in paths]
    if full is None:
        full = sum(p.stat().st_size for p in paths if p.is_file()) <= FULL_CHECK_BYTES
    for p in paths:
        check_file(p, what, full)
