"""Reading images from untrusted files (decompression bombs, EXIF orientation, 16 bits, alpha) and saving them.

Every image msattn reads goes through :func:`open_image`; every image it writes through
:func:`save_image` (atomically, :func:`msattn.io.atomic_write`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from msattn.errors import DataError
from msattn.io import MAX_PIXELS_ENV, atomic_write, max_pixels_limit

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
