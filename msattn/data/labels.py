"""Rules for label maps that cannot be right: one place, used by datasets, evaluate and crf-refine.

A label map holds class indices ``0..num_classes-1`` and ``ignore_index`` (255) for pixels
that are not scored. The rules here take the values, palette and sizes a reader already has
and return messages (without the file name, so that a caller can group files by message):

- values outside the classes: an error (:func:`bad_label_values`);
- only 0 and ``ignore_index``: a binary mask whose foreground would vanish (:func:`label_warnings`);
- a palette other than the dataset's (:func:`palette_warning`);
- an image whose EXIF orientation disagrees with its label (:func:`orient_to_label`);
- the same id twice in a list (:func:`dedupe_ids`).

:class:`WarningLog` collects (file, message) pairs and prints one line per message naming
the first files, so that 1,000 bad labels give one line, not 1,000.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import ImageOps

from msattn.images import EXIF_ORIENTATION

#: How many file names a grouped warning lists before "and N more".
SHOWN_FILES = 3


def bad_label_values(values: Iterable[int], num_classes: int, ignore_index: int = 255) -> list[int]:
    """The values (sorted) that are neither a class index ``0..num_classes-1`` nor ``ignore_index``."""
    return sorted(int(v) for v in values if (v < 0 or v >= num_classes) and v != ignore_index)


def label_warnings(values: Iterable[int], num_classes: int, ignore_index: int = 255) -> list[str]:
    """Warnings for a label map holding ``values`` (its distinct values) in a ``num_classes`` dataset.

    Values outside the classes are errors, not warnings (:func:`bad_label_values`). A map of
    only 0 and ``ignore_index`` is a binary mask saved as 0/255: the foreground is ignored,
    not scored, and an evaluation reads 100% on the background alone. A map of only
    ``ignore_index`` holds nothing to learn. ``msattn check-data`` applies the same rules.
    """
    present = {int(v) for v in values}
    messages = []
    if present == {ignore_index}:
        messages.append(f"every pixel is {ignore_index} (ignore): nothing to learn or score here")
    elif num_classes >= 2 and present == {0, ignore_index}:
        messages.append(
            f"holds only the values 0 and {ignore_index}: a binary mask? {ignore_index} means 'ignore' here, so "
            f"its foreground is neither trained nor scored; store the foreground as a class index (1..{num_classes - 1})"
        )
    return messages


def palette_warning(label_palette: Sequence[int] | None, dataset_palette: Sequence[Sequence[int]]) -> str | None:
    """A warning when a palette PNG's colours for the dataset's classes differ from ``dataset.json``'s.

    ``label_palette`` is PIL's flat ``[r, g, b, r, g, b, ...]`` (None for greyscale labels: no
    warning); ``dataset_palette`` the ``[[r, g, b], ...]`` of ``dataset.json``, one per class.
    Different colours suggest labels made for another class list (another dataset's indices).
    """
    if not label_palette or not dataset_palette:
        return None
    flat = list(label_palette)
    for index, rgb in enumerate(dataset_palette):
        found = flat[3 * index : 3 * index + 3]
        if len(found) == 3 and list(found) != [int(v) for v in rgb]:
            return (
                f"its palette colours class {index} {tuple(found)}, dataset.json says {tuple(int(v) for v in rgb)}: "
                "made for another class list? (the values are read as class indices either way)"
            )
    return None


def orient_to_label(image: Any, label_size: tuple[int, int]) -> tuple[Any, str | None]:
    """The PIL ``image`` turned by its EXIF orientation when its label was drawn on the turned image.

    ``label_size`` is the label's (width, height). A photo with an EXIF orientation is shown
    turned by viewers (and by ``msattn predict``); its label may have been drawn on the turned
    image (annotation tools that honour EXIF) or on the stored pixels (VOC-style pipelines).
    The sizes decide: the turned image when it matches the label (also when both match, as for
    a 180-degree turn: label what you see), else the stored pixels with a warning that predict
    will see the photo turned. Returns (image, warning or None).
    """
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in (1, None):
        return image, None
    turned = ImageOps.exif_transpose(image)
    if turned.size == tuple(label_size) or image.size != tuple(label_size):
        return turned, None  # a size mismatch is reported by the caller against the turned size
    return image, (
        f"has EXIF orientation {orientation} but its label matches the stored, unturned pixels: read unturned "
        "(msattn predict shows the photo turned, as viewers do)"
    )


def dedupe_ids(ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """``ids`` with repeats dropped (first kept) and the repeated ids (each once, in order)."""
    seen: dict[str, int] = {}
    for item_id in ids:
        seen[item_id] = seen.get(item_id, 0) + 1
    return list(seen), [item_id for item_id, count in seen.items() if count > 1]


def duplicate_warning(repeated: Sequence[str], source: Any) -> str | None:
    """The warning for ids listed more than once in ``source`` (they are counted once)."""
    if not repeated:
        return None
    more = f" and {len(repeated) - SHOWN_FILES} more" if len(repeated) > SHOWN_FILES else ""
    shown = ", ".join(repeated[:SHOWN_FILES]) + more
    return f"{source}: {len(repeated)} id(s) listed more than once, counted once: {shown}"


@dataclass
class WarningLog:
    """Warnings about files, grouped by message: ``add(file, message)``, then :meth:`lines`."""

    by_message: dict[str, list[str]] = field(default_factory=dict)

    def add(self, file: Any, message: str) -> None:
        files = self.by_message.setdefault(message, [])
        if str(file) not in files:
            files.append(str(file))

    def extend(self, file: Any, messages: Iterable[str]) -> None:
        for message in messages:
            self.add(file, message)

    def lines(self) -> list[str]:
        """One line per message: ``<file>: <message>`` for one file, else the count and the first files."""
        out = []
        for message, files in self.by_message.items():
            if len(files) == 1:
                out.append(f"{files[0]}: {message}")
                continue
            shown = ", ".join(files[:SHOWN_FILES])
            more = f" and {len(files) - SHOWN_FILES} more" if len(files) > SHOWN_FILES else ""
            out.append(f"{len(files)} files ({shown}{more}), each: {message}")
        return out

    def __bool__(self) -> bool:
        return bool(self.by_message)


def distinct_values(label: np.ndarray) -> list[int]:
    """The distinct values of a label map, sorted (via a histogram: fast for uint8)."""
    if label.dtype == np.uint8:
        return [int(v) for v in np.flatnonzero(np.bincount(label.ravel(), minlength=256))]
    return [int(v) for v in np.unique(label)]
