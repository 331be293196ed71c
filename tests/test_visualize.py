"""Palette colouring, overlays, heat maps and the paper-style attention figure (synthetic arrays)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from msattn.visualize import (
    attention_figure,
    attention_heatmap,
    colorize,
    colour_bar,
    full_palette,
    heat_colors,
    label_image,
    overlay,
    scale_title,
    voc_palette,
)


def _colour_count(img: Image.Image, colour: tuple[int, int, int], tol: int = 1) -> int:
    arr = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(arr - np.array(colour)).max(axis=-1) <= tol).sum())


def test_voc_palette_known_colours() -> None:
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert tuple(pal[0]) == (0, 0, 0)
    assert tuple(pal[1]) == (128, 0, 0)  # aeroplane
    assert tuple(pal[2]) == (0, 128, 0)  # bicycle
    assert tuple(pal[15]) == (192, 128, 128)  # person
    assert tuple(pal[255]) == (224, 224, 192)  # void
    assert len({tuple(c) for c in pal[:21]}) == 21


def test_full_palette_overrides_and_rejects_bad_colours() -> None:
    pal = full_palette([[1, 2, 3], [4, 5, 6]])
    assert tuple(pal[0]) == (1, 2, 3) and tuple(pal[1]) == (4, 5, 6)
    assert tuple(pal[2]) == tuple(voc_palette()[2])
    with pytest.raises(ValueError):
        full_palette([[0, 0, 300]])


def test_label_image_round_trips_indices_and_palette(tmp_path) -> None:
    labels = np.array([[0, 1, 2], [15, 255, 20]], dtype=np.uint8)
    path = tmp_path / "l.png"
    label_image(labels, [[10, 20, 30], [40, 50, 60]]).save(path)
    back = Image.open(path)
    assert back.mode == "P"
    np.testing.assert_array_equal(np.asarray(back), labels)
    pal = np.array(back.getpalette()[:9]).reshape(3, 3)
    np.testing.assert_array_equal(pal[:2], [[10, 20, 30], [40, 50, 60]])
    np.testing.assert_array_equal(np.asarray(back.convert("RGB"))[1, 0], voc_palette()[15])
    with pytest.raises(ValueError):
        label_image(np.array([[256]]))


def test_colorize_and_overlay_blend_values() -> None:
    labels = np.array([[0, 1], [255, 1]], dtype=np.uint8)
    palette = [[0, 0, 0], [200, 100, 0]]
    np.testing.assert_array_equal(colorize(labels, palette)[0, 1], [200, 100, 0])
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    out = np.asarray(overlay(image, labels, palette, alpha=0.5))
    np.testing.assert_array_equal(out[0, 0], [50, 50, 50])  # (100 + 0) / 2
    np.testing.assert_array_equal(out[0, 1], [150, 100, 50])  # (100 + [200,100,0]) / 2
    np.testing.assert_array_equal(out[1, 0], [100, 100, 100])  # ignore keeps the image


def test_heat_colors_scale_ends_and_clipping() -> None:
    v = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, np.nan])
    c = heat_colors(v)
    assert c.shape == (6, 3) and c.dtype == np.uint8
    assert tuple(c[1]) == (0, 0, 128) and tuple(c[3]) == (128, 0, 0)
    assert tuple(c[0]) == tuple(c[1]) and tuple(c[4]) == tuple(c[3]) and tuple(c[5]) == tuple(c[1])
    assert c[2, 1] == 255 and 120 <= c[2, 0] <= 135  # green-yellow in the middle
    ramp = heat_colors(np.linspace(0, 0.875, 50))
    assert (np.diff(ramp[:, 0].astype(int)) >= 0).all()  # red grows with the weight


def test_colour_bar_runs_from_one_at_top_to_zero_at_bottom() -> None:
    bar = np.asarray(colour_bar(200))
    column = bar[:, 5].astype(int)
    reds = np.where((np.abs(column - [128, 0, 0]).max(axis=1) <= 3))[0]
    blues = np.where((np.abs(column - [0, 0, 128]).max(axis=1) <= 3))[0]
    assert len(reds) and len(blues) and reds.max() < blues.min()


def test_attention_heatmap_blends_weights_over_image_with_legend() -> None:
    image = np.full((200, 240, 3), 100, dtype=np.uint8)
    weights = np.zeros((200, 240), dtype=np.float32)
    weights[:, :120] = 1.0
    img = attention_heatmap(image, weights, title="scale 1", alpha=0.5)
    assert img.height > 200 and img.width > 240  # title band and legend around a native-size panel
    hot, cold = (114, 50, 50), (50, 50, 114)  # 0.5 * 100 + 0.5 * jet(1) / jet(0)
    assert _colour_count(img, hot) >= 200 * 118 and _colour_count(img, cold) >= 200 * 118
    small = attention_heatmap(image[:40, :48], weights[:40, :48])
    assert small.height >= 192  # tiny images are enlarged to stay legible


def test_attention_figure_has_a_panel_per_scale_and_a_class_key() -> None:
    h, w = 60, 80
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    labels = np.zeros((h, w), dtype=np.uint8)
    labels[:, 40:] = 2
    palette = [[0, 0, 0], [11, 222, 33], [250, 10, 200]]
    att2 = np.stack([np.full((h, w), 1.0), np.zeros((h, w))])
    att3 = np.stack([np.full((h, w), 1.0), np.zeros((h, w)), np.zeros((h, w))])
    fig2 = attention_figure(image, labels, att2, [1.0, 0.5], palette, ["bg", "absent", "thing"])
    fig3 = attention_figure(image, labels, att3, [1.0, 0.75, 0.5], palette, ["bg", "absent", "thing"])
    assert fig3.width > fig2.width + 150  # one more panel (>= 192 px high, so > 250 px wide)
    assert _colour_count(fig3, (250, 10, 200), tol=0) > 1000  # prediction panel + class key
    assert _colour_count(fig3, (11, 222, 33), tol=0) == 0  # absent class: not in the key
    panel = 192 * 256  # 60x80 enlarged to 192 px high
    assert panel <= _colour_count(fig3, (128, 0, 0), tol=0) < 1.1 * panel  # the weight-1 panel (+ legend top)
    assert 2 * panel <= _colour_count(fig3, (0, 0, 128), tol=0) < 2.1 * panel  # two weight-0 panels
    no_key = attention_figure(image, labels, att3, [1.0, 0.75, 0.5], palette)
    assert no_key.height < fig3.height
    with pytest.raises(ValueError):
        attention_figure(image, labels, att2, [1.0, 0.75, 0.5], palette)


def test_scale_titles() -> None:
    assert scale_title(0.75) == "scale 0.75"
    assert scale_title(1.0, "max") == "scale 1 won"
    assert scale_title(0.5, "hierarchical") == "scale 0.5 (chain)"  # the chain's effective weight
