"""The files ``msattn predict`` writes per image, and the label information it takes from a checkpoint.

Per image ``<name>``: ``<name>.png`` (palette label map), ``<name>_overlay.jpg``, with
probabilities ``<name>.npz``, with attention ``<name>_attention_<scale>.png`` and
``<name>_attention.png``. Every file is written atomically and carries the mark of what made
it (:mod:`msattn.outputs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msattn.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from msattn.images import save_image
from msattn.io import atomic_write
from msattn.outputs import NPZ_MARK, mark_params
from msattn.runtime.checkpoint import dataset_meta
from msattn.tiling.preview import overlay_bands, picture_views
from msattn.visualize import attention_figure, attention_heatmap, label_image, scale_title, voc_palette


@dataclass(frozen=True)
class Outputs:
    """Which files predict writes per image: ``<name>.png`` always, the rest on request."""

    save_probs: bool = False
    save_attention: bool = False
    overlay: bool = True

    def files(self, name: str, scales: Sequence[float]) -> list[str]:
        """File names written for image ``name``."""
        files = [f"{name}.png"] + ([f"{name}_overlay.jpg"] if self.overlay else [])
        if self.save_probs:
            files.append(f"{name}.npz")
        if self.save_attention and len(scales) > 1:
            files += [attention_file(name, s) for s in scales] + [f"{name}_attention.png"]
        return files


def attention_file(name: str, scale: float) -> str:
    """``<name>_attention_<scale>.png`` with the scale written as a float (1.0, 0.75, 0.5)."""
    return f"{name}_attention_{float(scale)}.png"


# ----------------------------------------------------------------------------- writing


@dataclass
class _Labels:
    """What predict needs from the checkpoint's dataset section."""

    classes: list[str]
    palette: np.ndarray  # uint8 [K,3]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _dataset_info(ckpt: dict[str, Any], num_classes: int, source: Path) -> _Labels:
    meta = dataset_meta(ckpt, source)
    classes = meta["classes"] or [str(i) for i in range(num_classes)]
    palette = np.asarray(meta["palette"], dtype=np.uint8) if meta["palette"] else voc_palette(num_classes)
    return _Labels(classes, palette, tuple(meta["mean"] or IMAGENET_MEAN), tuple(meta["std"] or IMAGENET_STD))


def _write_npz(path: Path, arrays: dict[str, np.ndarray], mark: Any = None) -> None:
    if mark is not None:
        arrays = {**arrays, NPZ_MARK: np.asarray(mark.text())}
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def write_prediction(
    out: Path,
    name: str,
    image: np.ndarray,
    probs: np.ndarray,
    attention: np.ndarray | None,
    labels: np.ndarray,
    info: _Labels,
    scales: Sequence[float],
    merge: str,
    outputs: Outputs,
    mark: Any = None,
) -> None:
    """Write one image's files (all atomically): labels PNG, overlay, optional npz and attention maps.

    ``mark`` (:class:`msattn.outputs.Mark`) is embedded in every file: what made it. The label PNG
    and npz are full size; the overlay and attention pictures of huge images are downscaled
    (:mod:`msattn.tiling.preview`). ``probs``/``attention`` may be float16 or memory-mapped.
    """
    def save(img: Any, file: str, **params: Any) -> None:
        path = out / file
        save_image(img, path, **params, **(mark_params(path, mark) if mark is not None else {}))

    save(label_image(labels, info.palette), f"{name}.png")
    views = picture_views(image, labels, attention if outputs.save_attention else None, merge)  # smaller when huge
    if outputs.overlay:
        picture = overlay_bands(views.overlay_image, views.overlay_labels, info.palette)
        save(_fit_jpeg(picture), f"{name}_overlay.jpg", quality=90)
    if outputs.save_probs:
        arrays = {
            "probs": np.asarray(probs, dtype=np.float16),  # no copy of a float16 (memory-mapped) store
            "scales": np.asarray(scales, dtype=np.float32),
            "classes": np.asarray(info.classes, dtype=str),
            "palette": info.palette,
        }
        if attention is not None:
            arrays["attention"] = np.asarray(attention, dtype=np.float16)
        _write_npz(out / f"{name}.npz", arrays, mark)
    if outputs.save_attention and views.figure_weights is not None:
        for weights, scale in zip(views.figure_weights, scales):
            heat = attention_heatmap(views.figure_image, weights, title=scale_title(scale, merge))
            save(heat, attention_file(name, scale))
        figure = attention_figure(
            views.figure_image, views.figure_labels, views.figure_weights, scales, info.palette, info.classes, merge
        )
        save(figure, f"{name}_attention.png")


#: JPEG stores sides up to 65,535 pixels; a wider overlay (a 70000x4 strip) is scaled down to fit.
JPEG_MAX_SIDE = 65_500


def _fit_jpeg(img: Any) -> Any:
    """``img`` scaled down (aspect kept) when a side exceeds :data:`JPEG_MAX_SIDE`."""
    factor = JPEG_MAX_SIDE / max(img.size)
    if factor >= 1:
        return img
    return img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))))
