"""Pictures of predictions and attention weights, drawn with PIL only.

- :func:`colorize` / :func:`label_image`: class indices -> palette colours / palette PNG.
- :func:`overlay`: colour labels blended over the image.
- :func:`attention_heatmap`: one scale's weights w^s over the image, colour scale 0..1 with a legend.
- :func:`attention_figure`: the paper-style figure (Figures 4-6 of Chen et al.): image,
  prediction and the weight map of every scale side by side, titled with the scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from msattn.data.palette import voc_colormap

IGNORE_INDEX = 255
_BG = (255, 255, 255)
_FG = (20, 20, 20)
_MIN_PANEL, _MAX_PANEL = 192, 384  # panel heights in figures (small images are enlarged)
_MAX_PANEL_WIDTH = 2048  # no panel is enlarged past this width (a 20000x8 strip stays 20000x8, not 480000x192)


# ----------------------------------------------------------------------------- palettes


def voc_palette(num: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), uint8 [num,3]; index 255 is the void colour."""
    return np.asarray(voc_colormap(num), dtype=np.uint8).reshape(num, 3)


def full_palette(palette: Any = None) -> np.ndarray:
    """A 256-entry uint8 palette: the given colours ([[r,g,b],...]) first, VOC colours after."""
    full = voc_palette(256)
    if palette is not None:
        given = np.asarray(palette, dtype=np.int64).reshape(-1, 3)[:256]
        if given.size and (given.min() < 0 or given.max() > 255):
            raise ValueError("palette colours must be in 0..255")
        full[: len(given)] = given.astype(np.uint8)
    return full


def colorize(labels: np.ndarray, palette: Any = None) -> np.ndarray:
    """Class indices [H,W] (0..255) -> uint8 RGB [H,W,3]."""
    return full_palette(palette)[np.asarray(labels, dtype=np.uint8)]


def label_image(labels: np.ndarray, palette: Any = None) -> Image.Image:
    """Class indices [H,W] -> 8-bit palette ("P") PIL image whose pixel values are the indices."""
    labels = np.asarray(labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError("label values must be in 0..255 to fit an 8-bit palette PNG")
    data = np.ascontiguousarray(labels, dtype=np.uint8)
    img = Image.frombytes("P", (data.shape[1], data.shape[0]), data.tobytes())
    img.putpalette(full_palette(palette).reshape(-1).tolist())
    return img


def overlay(image: np.ndarray, labels: np.ndarray, palette: Any = None, alpha: float = 0.5) -> Image.Image:
    """Colour labels blended over ``image`` (uint8 [H,W,3]); ignore pixels (255) keep the image."""
    image = np.asarray(image, dtype=np.float32)
    colours = colorize(labels, palette).astype(np.float32)
    mixed = (1 - alpha) * image + alpha * colours
    keep = np.asarray(labels) == IGNORE_INDEX
    mixed[keep] = image[keep]
    return Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- heat maps

#: Jet-like colour map anchors (value, r, g, b), as in the paper's weight maps.
_JET = np.array(
    [
        [0.000, 0, 0, 128],
        [0.125, 0, 0, 255],
        [0.375, 0, 255, 255],
        [0.625, 255, 255, 0],
        [0.875, 255, 0, 0],
        [1.000, 128, 0, 0],
    ],
    dtype=np.float64,
)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values in [0,1] (clipped; NaN -> 0) of any shape -> uint8 RGB [..., 3] on a jet colour scale."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    channels = [np.interp(v, _JET[:, 0], _JET[:, c]) for c in (1, 2, 3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # PIL without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _panel_height(height: int) -> int:
    return int(min(max(height, _MIN_PANEL), _MAX_PANEL))


def _resize(img: Image.Image, height: int, nearest: bool = False, max_width: int = _MAX_PANEL_WIDTH) -> Image.Image:
    """``img`` scaled to ``height``, or less when that would make it wider than ``max_width`` (extreme strips)."""
    factor = min(height / img.height, max_width / img.width)
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    if size == img.size:
        return img
    return img.resize(size, Image.NEAREST if nearest else Image.BILINEAR)


def colour_bar(height: int, font_size: int = 12) -> Image.Image:
    """A vertical 0..1 legend: the colour bar (1 at the top) with ticks 0, 0.5, 1."""
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w, text_h = _text_size(probe, "0.5", font)
    bar_w, pad = 14, text_h // 2 + 2
    img = Image.new("RGB", (bar_w + 2 + 6 + text_w + 4, height), _BG)
    inner = max(height - 2 * pad, 2)
    ramp = np.linspace(1.0, 0.0, inner)[:, None].repeat(bar_w, axis=1)
    img.paste(Image.fromarray(heat_colors(ramp)), (1, pad))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, pad - 1, bar_w + 1, pad + inner), outline=_FG)  # frame outside the ramp
    for value, label in ((1.0, "1"), (0.5, "0.5"), (0.0, "0")):
        y = pad + round((1.0 - value) * (inner - 1))
        draw.line((bar_w + 2, y, bar_w + 5, y), fill=_FG)
        draw.text((bar_w + 8, y), label, fill=_FG, font=font, anchor="lm")
    return img


def _titled(panel: Image.Image, title: str, font: Any, band: int) -> Image.Image:
    img = Image.new("RGB", (panel.width, panel.height + band), _BG)
    img.paste(panel.convert("RGB"), (0, band))
    draw = ImageDraw.Draw(img)
    draw.text((panel.width / 2, band / 2), title, fill=_FG, font=font, anchor="mm")
    return img


def _hstack(panels: Sequence[Image.Image], gap: int) -> Image.Image:
    width = sum(p.width for p in panels) + gap * (len(panels) + 1)
    height = max(p.height for p in panels) + 2 * gap
    img = Image.new("RGB", (width, height), _BG)
    x = gap
    for panel in panels:
        img.paste(panel, (x, gap))
        x += panel.width + gap
    return img


def attention_heatmap(
    image: np.ndarray, weights: np.ndarray, title: str | None = None, alpha: float = 0.6
) -> Image.Image:
    """Weights w^s [H,W] (0..1) as a jet heat map blended over ``image`` (uint8 [H,W,3]), with a 0..1 legend."""
    heat = heat_colors(weights).astype(np.float32)
    mixed = (1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * heat
    panel = Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8))
    # native size; small images enlarged, but never past the panel width limit
    panel = _resize(panel, max(panel.height, _MIN_PANEL), max_width=max(panel.width, _MAX_PANEL_WIDTH))
    font_size = max(12, min(panel.height, panel.width) // 16)  # a tall strip gets no giant title
    band = font_size + 10
    titled = _titled(panel, title or "", _font(font_size), band)
    bar = colour_bar(max(panel.height, 64), font_size)
    legend = Image.new("RGB", (bar.width, max(titled.height, bar.height + band)), _BG)
    legend.paste(bar, (0, band))
    return _hstack([titled, legend], gap=6)


def scale_title(scale: float, merge: str = "attention") -> str:
    """Panel title for one scale's weight map: "scale 0.75"; for max merging "scale 0.75 won" (where it
    won); for hierarchical attention "scale 0.75 (chain)" (the effective weight: the chain's product)."""
    if merge == "max":
        return f"scale {scale:g} won"
    if merge == "hierarchical":
        return f"scale {scale:g} (chain)"
    return f"scale {scale:g}"


def attention_figure(
    image: np.ndarray,
    labels: np.ndarray,
    attention: np.ndarray,
    scales: Sequence[float],
    palette: Any = None,
    classes: Sequence[str] | None = None,
    merge: str = "attention",
) -> Image.Image:
    """Paper-style figure: image | prediction | weight map of each scale (titled), a 0..1 legend
    and, when ``classes`` are given, a key of the classes present in the prediction.

    image uint8 [H,W,3]; labels [H,W] class indices; attention float [S,H,W] in 0..1.
    """
    attention = np.asarray(attention)
    if attention.ndim != 3 or attention.shape[0] != len(scales):
        raise ValueError(f"attention must be [S,H,W] with S = {len(scales)} scales, got {attention.shape}")
    height = _panel_height(np.asarray(image).shape[0])
    font_size = max(12, height // 16)
    font, band = _font(font_size), font_size + 10
    panels = [
        (_resize(Image.fromarray(np.asarray(image, dtype=np.uint8)), height), "image"),
        (_resize(Image.fromarray(colorize(labels, palette)), height, nearest=True), "prediction"),
    ]
    for weights, scale in zip(attention, scales):
        heat = Image.fromarray(heat_colors(weights))
        panels.append((_resize(heat, height, nearest=merge == "max"), scale_title(scale, merge)))
    titled = [_titled(p, t, font, band) for p, t in panels]
    bar_height = max(panels[0][0].height, 64)  # panels of an extreme strip are shorter than `height`
    bar = colour_bar(bar_height, font_size)
    legend = Image.new("RGB", (bar.width, bar_height + band), _BG)
    legend.paste(bar, (0, band))
    row = _hstack([*titled, legend], gap=8)
    if not classes:
        return row
    key = _class_key(labels, palette, classes, row.width, font)
    fig = Image.new("RGB", (row.width, row.height + key.height), _BG)
    fig.paste(row, (0, 0))
    fig.paste(key, (0, row.height))
    return fig


def _class_key(labels: np.ndarray, palette: Any, classes: Sequence[str], width: int, font: Any) -> Image.Image:
    """Colour swatches with names for the classes present in ``labels``, wrapped to ``width``."""
    present = [int(c) for c in np.unique(labels) if c != IGNORE_INDEX]
    colours = full_palette(palette)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, text_h = _text_size(probe, "Ag", font)
    line_h, swatch, gap = text_h + 12, text_h + 2, 8
    entries, x, y = [], gap, 0
    for c in present:
        name = classes[c] if c < len(classes) else str(c)
        w = swatch + 4 + _text_size(probe, name, font)[0]
        if x + w > width - gap and x > gap:
            x, y = gap, y + line_h
        entries.append((x, y, c, name))
        x += w + 2 * gap
    img = Image.new("RGB", (width, y + line_h + gap), _BG)
    draw = ImageDraw.Draw(img)
    for x, y, c, name in entries:
        draw.rectangle((x, y + 4, x + swatch, y + 4 + swatch), fill=tuple(int(v) for v in colours[c]), outline=_FG)
        draw.text((x + swatch + 4, y + 4 + swatch / 2), name, fill=_FG, font=font, anchor="lm")
    return img
