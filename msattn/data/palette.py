"""Colour palettes for label PNGs (value = class index, 255 = ignore)."""

from __future__ import annotations


def voc_colormap(n: int = 256) -> list[list[int]]:
    """PASCAL VOC's bit-interleaved colour map: ``n`` ``[r, g, b]`` entries (index 255 is the void colour)."""
    cmap = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap.append([r, g, b])
    return cmap


def flat_palette(colours: list[list[int]] | None = None) -> list[int]:
    """A 768-value PIL palette: ``colours`` first, the VOC colour map for every other index (255 keeps VOC's void)."""
    full = voc_colormap(256)
    for i, rgb in enumerate(colours or []):
        if i < 255:
            full[i] = [int(v) for v in rgb]
    return [v for rgb in full for v in rgb]
