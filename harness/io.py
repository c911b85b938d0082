"""Small file helpers: atomic writes, content hashes, JSON lines."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from harness.errors import DiskFullError


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask can only set it: setting and
    restoring it would let another thread create a file with no umask in between)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes, replace: bool = True) -> bool:
    """Write `data` to `path` so that a reader never sees a half-written file. The temporary file has a unique
    name (concurrent writers of one path do not collide; the last rename wins) and gets the permissions a plain
    open() would give (mkstemp makes it 0600 whatever the umask; published results must be readable).
    `replace=False` keeps a file already at `path` (checked and written in one step) and returns False."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if the file exists, where a rename would replace it
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            raise no_space(path, len(data)) from None
        raise


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(path: Path, needed: int | None = None) -> DiskFullError:
    """The one-line error for a write that found the disk (or the quota) full: the file, and the space needed."""
    where = Path(path).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    wanted = f"{_size(needed)} to write, " if needed is not None else ""
    return DiskFullError(f"{path}: no space left on the device ({wanted}{_size(free)} free); free some space and run "
                         f"again: finished work is kept")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def atomic_write_text(path: Path, text: str, replace: bool = True) -> bool:
    return atomic_write_bytes(path, text.encode("utf-8"), replace)


def atomic_write_json(path: Path, obj: Any, replace: bool = True) -> bool:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", replace)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@contextlib.contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; it becomes `final` only if the block succeeds."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final}: already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def cached_file_hash(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for the life of the process."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_file(Path(path))
    return _FILE_HASHES[key]


def sha256_json(obj: Any) -> str:
    """Hash of the canonical JSON form of `obj` (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
