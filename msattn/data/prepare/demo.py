"""A synthetic dataset where scale matters: stick figures with parts, at sizes spanning about 9x.

Each image shows 1-4 figures on a textured background with a few plain distractor shapes. A figure
has a skin-coloured round head, a shirt-coloured torso, arms in a darker shade of the shirt colour
and legs in dark trouser colours; pose, colours and position vary. Figure heights are drawn
log-uniformly between 11% and 95% of the image side, so a part is a few pixels in one image and
tens of pixels in another. Image ``i`` of a split depends only on ``(seed, split, i, image_size,
style)`` (``numpy.random.default_rng([seed, 0 train | 1 val, i])``), whatever the number of workers.

Styles (:data:`STYLES`): ``figures`` (the above, the default) and ``silhouettes``, where every
figure is drawn in one colour (parts told apart by shape and layout alone) and heights reach 3x
the image side (close-ups cut at the border): the variant on which attention learns to prefer the
coarser input for large figures (docs/attention-collapse.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from msattn.data.prepare.common import SPLITS, PrepareSummary, Result, Task
from msattn.data.prepare.finish import RunInfo, finish
from msattn.data.prepare.output_folder import locked_output, prepare_output
from msattn.data.prepare.runner import run_tasks
from msattn.data.prepare.writer import DecodedImage, Target, write_item
from msattn.errors import UsageError

CLASSES = ("background", "head", "torso", "arms", "legs")
HEAD, TORSO, ARMS, LEGS = 1, 2, 3, 4
JPEG_QUALITY = 92


@dataclass(frozen=True)
class DemoStyle:
    """How the scenes are drawn (recorded in ``dataset.json``)."""

    #: figure height as a fraction of the image side (log-uniform); above ~1.2 the figure is cut
    height_range: tuple[float, float] = (0.11, 0.95)
    #: share of figures drawn in one colour (parts told apart by shape and layout only)
    silhouette: float = 0.0
    #: arms are the shirt colour times this (1.0: arms and torso alike)
    arm_shade: float = 0.7
    #: share of distractors drawn in a shirt-like (saturated) colour
    shirt_distractors: float = 0.0


STYLES = {
    "figures": DemoStyle(),
    "silhouettes": DemoStyle(height_range=(0.11, 3.0), silhouette=1.0),
}
#: the default style's height range: 0.11 .. 0.95 (ratio 8.6)
HEIGHT_RANGE = STYLES["figures"].height_range

_SKIN = np.array([[224, 172, 138], [198, 134, 95], [141, 85, 56], [241, 194, 160], [170, 110, 75]], dtype=float)
_TROUSERS = np.array([[35, 45, 90], [45, 45, 50], [80, 55, 35], [20, 20, 25], [60, 70, 110]], dtype=float)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random ``cells x cells`` grid upsampled bilinearly to ``size``."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), dtype=float) / 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``[S, S, 3]`` float texture: two colours mixed by smooth noise, finer noise and grain on top."""
    c1, c2 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    mix = _value_noise(rng, size, int(rng.integers(3, 6)))[..., None]
    image = c1 * mix + c2 * (1 - mix)
    image += (_value_noise(rng, size, int(rng.integers(10, 24))) - 0.5)[..., None] * rng.uniform(20, 50)
    return image


def _capsule(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within ``radius`` of the segment ``p0 -> p1`` (points are ``(x, y)``)."""
    d = p1 - p0
    length2 = float(d @ d) or 1e-9
    t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / length2, 0.0, 1.0)
    return (xx - p0[0] - t * d[0]) ** 2 + (yy - p0[1] - t * d[1]) ** 2 <= radius**2


def _limb(origin: np.ndarray, angle: float, bend: float, lengths: tuple[float, float]) -> list[np.ndarray]:
    """Joint positions of a two-segment limb; angles in radians from straight down."""
    a1, a2 = angle, angle + bend
    joint = origin + lengths[0] * np.array([np.sin(a1), np.cos(a1)])
    return [origin, joint, joint + lengths[1] * np.array([np.sin(a2), np.cos(a2)])]


def _figure_parts(rng: np.random.Generator, x: float, top: float, height: float) -> list[tuple[int, str, Any]]:
    """The shapes of one figure in drawing order: ``(class, kind, geometry)``; points are ``(x, y)``."""
    u = height
    lean = rng.uniform(-0.15, 0.15)
    down = np.array([np.sin(lean), np.cos(lean)])  # along the spine, neck -> hip
    side = np.array([np.cos(lean), -np.sin(lean)])
    neck = np.array([x, top + 0.19 * u])
    hip = neck + 0.34 * u * down
    shapes: list[tuple[int, str, Any]] = []
    for sign in (-1.0, 1.0):
        angle = sign * rng.uniform(0.05, 0.45) + lean
        joints = _limb(hip + sign * 0.05 * u * side, angle, -sign * rng.uniform(0.0, 0.5), (0.22 * u, 0.22 * u))
        shapes.append((LEGS, "capsule", (joints[0], joints[1], 0.06 * u)))
        shapes.append((LEGS, "capsule", (joints[1], joints[2], 0.055 * u)))
    shapes.append((TORSO, "capsule", (neck + 0.06 * u * down, hip, 0.12 * u)))
    for sign in (-1.0, 1.0):
        angle = sign * rng.uniform(0.15, 2.2) + lean
        shoulder = neck + 0.04 * u * down + sign * 0.12 * u * side
        joints = _limb(shoulder, angle, sign * rng.uniform(-0.3, 1.2), (0.16 * u, 0.15 * u))
        shapes.append((ARMS, "capsule", (joints[0], joints[1], 0.05 * u)))
        shapes.append((ARMS, "capsule", (joints[1], joints[2], 0.045 * u)))
    shapes.append((HEAD, "circle", (neck - 0.1 * u * down, 0.1 * u)))
    return shapes


def render_scene(
    rng: np.random.Generator, size: int, style: DemoStyle = STYLES["figures"]
) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """One image ``uint8[S, S, 3]``, its label ``uint8[S, S]`` and the figures drawn (``x``, ``top``, ``height``)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    image = _background(rng, size)
    label = np.zeros((size, size), dtype=np.uint8)

    for _ in range(int(rng.integers(0, 4))):  # distractors: plain shapes that stay background
        centre, radius = rng.uniform(0, size, 2), rng.uniform(0.04, 0.15) * size
        if rng.random() < 0.5:
            mask = (np.abs(xx - centre[0]) < radius) & (np.abs(yy - centre[1]) < radius * rng.uniform(0.3, 1.5))
        else:
            mask = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 < radius**2
        colour = rng.uniform(30, 225, 3)
        if style.shirt_distractors > 0 and rng.random() < style.shirt_distractors:
            colour[rng.integers(0, 3)] = rng.uniform(0, 60)  # saturated, like a shirt
        image[mask] = colour

    figures = []
    low, high = np.log(style.height_range[0] * size), np.log(style.height_range[1] * size)
    for _ in range(int(rng.integers(1, 5))):
        height = float(np.exp(rng.uniform(low, high)))
        x = float(rng.uniform(0.12, 0.88) * size)
        lo, hi = -0.05 * height, size - 0.9 * height  # figures taller than ~1.2 images: cut at the border
        top = float(rng.uniform(min(lo, hi), max(lo, hi)))
        shirt = rng.uniform(40, 230, 3)
        shirt[rng.integers(0, 3)] = rng.uniform(0, 60)  # saturated
        colours = {HEAD: _SKIN[rng.integers(len(_SKIN))], TORSO: shirt, ARMS: shirt * style.arm_shade,
                   LEGS: _TROUSERS[rng.integers(len(_TROUSERS))]}  # fmt: skip
        if style.silhouette > 0 and rng.random() < style.silhouette:
            colours = dict.fromkeys(colours, rng.uniform(20, 235, 3))
        for class_index, kind, geometry in _figure_parts(rng, x, top, height):
            if kind == "circle":
                centre, radius = geometry
                mask = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= max(radius, 0.7) ** 2
            else:
                p0, p1, radius = geometry
                mask = _capsule(yy, xx, p0, p1, max(radius, 0.6))
            image[mask] = colours[class_index] + rng.normal(0, 6, 3)
            label[mask] = class_index
        figures.append({"x": x, "top": top, "height": height})

    image += rng.normal(0, 5, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label, figures


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _process(task: Task, target: Target) -> Result:
    seed, index, size, style = task.payload
    image, label, _ = render_scene(scene_rng(seed, task.split, index), size, style)
    return write_item(target, task, label, DecodedImage(Image.fromarray(image), task.id, quality=JPEG_QUALITY), task.id)


@locked_output()
def prepare_demo(
    out: Path,
    num_train: int = 240,
    num_val: int = 60,
    image_size: int = 96,
    seed: int = 0,
    workers: int = 2,
    style: str = "figures",
) -> PrepareSummary:
    """Generate the demo dataset into ``out``: ``train_00000.jpg``..., ``val_00000.jpg``..., 5 classes."""
    out = Path(out)
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    if min(num_train, num_val) < 1 or image_size < 16:
        raise UsageError("need num_train >= 1, num_val >= 1 and image_size >= 16")
    if style not in STYLES:
        raise UsageError(f"--style must be one of {', '.join(STYLES)}, got {style!r}")
    drawing = STYLES[style]
    params: dict[str, Any] = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    if style != "figures":  # the default style leaves the settings (and so old folders) as they were
        params["style"] = style
    prepare_output(out, "demo", params)
    counts = {"train": num_train, "val": num_val}
    tasks = [
        Task(split, f"{split}_{index:05d}", (seed, index, image_size, drawing))
        for split in SPLITS
        for index in range(counts[split])
    ]
    target = Target("demo", out, CLASSES)
    results = run_tasks(_process, tasks, target, workers)
    sources = {"generator": "msattn.data.prepare.demo", **params, "height_range": list(drawing.height_range),
               **({"style": style, "drawing": asdict(drawing)} if style != "figures" else {})}  # fmt: skip
    return finish(target, results, RunInfo(out, sources))
