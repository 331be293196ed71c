"""Crash-safe file writing and careful reading of untrusted inputs.

Every file msattn writes goes through :func:`atomic_write`: the bytes land in a
temporary file in the same folder, are flushed to disk and then renamed over the
target, so a killed process leaves either the old file or the new one, never a
truncated one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from msattn.errors import DataError, ResourceError, UsageError

#: Images with more pixels than this are refused (decompression bombs); 0 disables the check.
DEFAULT_MAX_PIXELS = 100_000_000
#: Environment variable (set by ``msattn --max-pixels N``) that changes the default limit.
MAX_PIXELS_ENV = "MSATTN_MAX_PIXELS"

_TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success fsync and rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    A full disk raises :class:`ResourceError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        if exc.errno == 28:  # ENOSPC
            raise ResourceError(f"{path}: no space left on device; free disk space and retry") from exc
        raise
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: os.umask can only be read by setting it


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def is_temporary(path: Path) -> bool:
    """True for the temporary files :func:`atomic_write` leaves behind when killed."""
    return path.name.startswith(_TMP_PREFIX)


def clean_temporaries(folder: Path) -> int:
    """Remove leftover temporary files (from a killed run) directly inside ``folder``."""
    removed = 0
    if folder.is_dir():
        for child in folder.iterdir():
            if is_temporary(child) and child.is_file():
                _unlink_quietly(str(child))
                removed += 1
    return removed


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`DataError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # a UTF-8 BOM (Windows editors) is accepted
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def check_id(item_id: str, source: str | os.PathLike[str]) -> str:
    """Return ``item_id`` if it is a plain file stem; reject path separators, ``..`` and empties."""
    bad = (
        not item_id
        or "/" in item_id
        or "\\" in item_id
        or item_id in {".", ".."}
        or ".." in item_id
        or "\x00" in item_id
        or item_id != item_id.strip()
    )
    if bad:
        raise DataError(f"{source}: invalid id {item_id!r} (ids must be plain names without '/', '\\' or '..')")
    return item_id


def read_list_lines(path: str | os.PathLike[str], what: str = "list file") -> list[str]:
    """Non-blank lines of a UTF-8 list file, stripped, ``#`` comments skipped; DataError names the file."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a UTF-8 BOM is accepted
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: {what} is not UTF-8 text") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a {what}") from None
    entries = (line.strip() for line in lines)
    return [entry for entry in entries if entry and not entry.startswith("#")]


def read_id_list(path: str | os.PathLike[str]) -> list[str]:
    """Read one id per line (blank lines and ``#`` comments skipped), validating every id."""
    return [check_id(item_id, path) for item_id in read_list_lines(path, "id list")]


def write_id_list(path: str | os.PathLike[str], ids: list[str]) -> None:
    """Write one id per line atomically."""
    write_text(path, "".join(f"{i}\n" for i in ids))


def max_pixels_limit() -> int:
    """The default pixel limit: ``$MSATTN_MAX_PIXELS`` (``msattn --max-pixels N``) or :data:`DEFAULT_MAX_PIXELS`."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"{MAX_PIXELS_ENV}={text!r}: expected a whole number of pixels >= 0 (0: no limit)")
    return value


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks: the identity of a checkpoint, model or annotation file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
