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


#: Suffixes of the image files msattn reads from folders (those this Pillow build can open; see image_suffixes).
IMAGE_SUFFIX_CANDIDATES = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".jp2", ".j2k", ".avif",
)  # fmt: skip
#: The EXIF tag of the orientation a viewer applies (1: as stored).
EXIF_ORIENTATION = 0x0112
#: What transparent pixels become when an image with alpha is read as RGB (composited over white).
ALPHA_BACKGROUND = (255, 255, 255)


def image_suffixes() -> tuple[str, ...]:
    """Lower-case suffixes of the image files msattn reads in folders (those Pillow can open here)."""
    from PIL import Image

    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return tuple(ext for ext in IMAGE_SUFFIX_CANDIDATES if ext in readable)


def is_image_file(path: Path) -> bool:
    """A file whose suffix is one of :func:`image_suffixes` (any case)."""
    return path.suffix.lower() in image_suffixes()


def open_image(
    path: str | os.PathLike[str], mode: str | None = "RGB", max_pixels: int | None = None, orient: bool = True
):
    """Open and fully decode an image; corrupt, truncated or oversized files raise :class:`DataError`.

    ``mode`` converts the result (``None`` keeps the file's mode, e.g. ``"P"`` for palette labels);
    ``"RGB"`` reads images as people see them (:func:`to_rgb`: 16-bit scaled, alpha composited over
    white). ``orient`` applies the EXIF orientation (as photo viewers do); label readers turn it off.
    ``max_pixels`` (None: :func:`max_pixels_limit`; 0: no limit) is checked on the header, before
    any pixel is decoded, so a decompression bomb costs nothing.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    limit = max_pixels_limit() if max_pixels is None else max_pixels
    Image.MAX_IMAGE_PIXELS = None  # the check below replaces PIL's own (which would warn, then refuse at 2x)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if limit and width * height > limit:
                raise DataError(
                    f"{path}: image has {width}x{height} = {width * height} pixels, over the limit of {limit} "
                    f"(if you trust the file, raise it: msattn --max-pixels N ..., {MAX_PIXELS_ENV}=N, "
                    "or data.max_pixels in a recipe)"
                )
            img.load()
            rotated = orient and img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
            result = ImageOps.exif_transpose(img) if rotated else img
            if mode == "RGB":
                return img.copy() if result is img and img.mode == "RGB" else to_rgb(result)  # detached from the file
            if mode and result.mode != mode:
                return result.convert(mode)
            return result.copy() if result is img else result
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an image") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None


def to_rgb(img: Any) -> Any:
    """A PIL image in any mode as 8-bit RGB, as a viewer shows it (an RGB image is returned as it is).

    16-bit and 32-bit greyscale (``I;16*``, ``I``) are scaled from 0..65535 to 0..255 (not clipped
    to white); float images (``F``) from 0..1 when their values lie there, else clipped to 0..255;
    transparent pixels (``RGBA``, ``LA``, ``PA``, palette or greyscale transparency) are composited
    over white (:data:`ALPHA_BACKGROUND`); everything else goes through Pillow's conversion.
    """
    import numpy as np
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            values = values * 255.0 if values.size and np.nanmax(values) <= 1.0 else values
        else:
            values = values / 257.0  # 65535 -> 255
        grey = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def save_image(img: Any, path: str | os.PathLike[str], **params: Any) -> None:
    """Save a PIL image atomically; the format follows the file suffix."""
    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unsupported image suffix: {path}")
    with atomic_write(path, "wb") as handle:
        img.save(handle, format=fmt, **params)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks: the identity of a checkpoint, model or annotation file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
