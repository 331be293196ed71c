"""Tiled inference: window layout, blending weights, band stitching, memory planning, exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiling_helpers import local_model, scene

from msattn.errors import ResourceError, UsageError
from msattn.infer.forward import predict_batch
from msattn.infer.tiled import predict_tiled
from msattn.sizes import parse_memory
from msattn.tiling.layout import axis_spans, make_tiling, scale_quantum, tile_weights, windows
from msattn.tiling.memory import MemoryModel, choose_tile
from msattn.tiling.run import Planner, TilingOptions, stitch_tiles
from msattn.tiling.stitch import Scratch, Stitcher

# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("length", [1, 64, 65, 66, 129, 200, 1000, 1601])
@pytest.mark.parametrize(("tile", "overlap", "quantum"), [(65, 16, 8), (129, 32, 16), (193, 64, 32), (129, 0, 8)])
def test_windows_cover_every_pixel_start_on_the_quantum_and_end_at_the_edge(length, tile, overlap, quantum) -> None:
    tiling = make_tiling(tile, overlap, quantum)
    spans = axis_spans(length, tiling)
    covered = np.zeros(length, dtype=int)
    for start, stop in spans:
        assert start % quantum == 0 and 0 < stop - start <= tile
        covered[start:stop] += 1
    assert covered.min() >= 1 and spans[-1][1] == length and spans[0][0] == 0
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert e0 - tile == s0  # every tile but the last is a whole tile (an 8k+1 grid side)
        assert e0 - s1 >= tiling.overlap + 1  # neighbours share at least the overlap (+ the grid pixel)
    assert len(windows(length, length, tiling)) == len(spans) ** 2


def test_scale_quantum_aligns_every_scale_grid() -> None:
    assert scale_quantum([1.0]) == 8 and scale_quantum([2.0, 1.0]) == 8
    assert scale_quantum([1.0, 0.5]) == 16 and scale_quantum([1.0, 0.75, 0.5]) == 32
    for scales in ([1.0, 0.75, 0.5], [1.0, 0.5], [1.5, 1.0]):
        q = scale_quantum(scales)
        assert all(float(q * s).is_integer() and (q * s) % 8 == 0 for s in scales)
    assert scale_quantum([1.0, 0.37]) == 8  # no small common grid: the stride-8 grid


@pytest.mark.parametrize(
    ("tile", "overlap", "message"),
    [(100, None, r"8k\+1 pixels.*use 97 or 105"), (33, None, "65"), (129, 200, "at most 112"), (129, -1, ">= 0")],
)
def test_bad_tiles_are_usage_errors(tile, overlap, message) -> None:
    with pytest.raises(UsageError, match=message):
        make_tiling(tile, overlap, 16)


def test_overlap_is_rounded_up_to_the_quantum_and_defaults_to_a_quarter() -> None:
    assert make_tiling(129, 20, 16).overlap == 32
    assert make_tiling(513, None, 8).overlap == 128 and make_tiling(1025, None, 32).overlap == 256


def test_weights_sum_to_one_are_positive_and_fade_tile_borders() -> None:
    tiling = make_tiling(129, 64, 16)
    h, w = 300, 410
    total = np.zeros((h, w))
    for (y0, x0), (rw, cw) in tile_weights(h, w, tiling).items():
        assert rw.min() > 0 and cw.min() > 0
        total[y0 : y0 + len(rw), x0 : x0 + len(cw)] += rw[:, None] * cw[None, :]
    np.testing.assert_allclose(total, 1.0, atol=5e-3)  # a partition of unity (up to the edge floor)
    rw, _ = tile_weights(h, w, tiling)[(64, 0)]  # an inner tile: its first/last rows barely count
    assert rw[0] < 0.01 and rw[-1] < 0.01 and rw[len(rw) // 2] == 1.0


# ----------------------------------------------------------------------------- stitching


def _field(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([np.sin(y / 37.0) + np.cos(x / 23.0), (y + 2 * x) / (h + 2 * w), np.full((h, w), 0.25, np.float32)])


def test_constant_model_gives_the_constant_everywhere() -> None:
    value = np.array([0.1, 0.6, 0.3], np.float32)

    def forward(win):
        h, w = win.size
        return np.broadcast_to(value[:, None, None], (3, h, w)).copy(), np.full((2, h, w), 0.5, np.float32)

    result = stitch_tiles((301, 257), make_tiling(65, 24, 8), forward, 3, 2, keep=("probs", "attention"))
    np.testing.assert_allclose(result.probs, np.broadcast_to(value[:, None, None], (3, 301, 257)), atol=1e-6)
    np.testing.assert_allclose(result.attention, 0.5, atol=1e-6)
    assert (result.labels == 1).all() and result.tiles == 7 * 6


def test_context_free_outputs_pass_unchanged_and_disagreeing_tiles_leave_no_seams() -> None:
    h, w = 250, 333
    field = _field(h, w)
    tiling = make_tiling(97, 48, 16)

    def exact(win):
        return field[:, win.y0 : win.y1, win.x0 : win.x1], None

    result = stitch_tiles((h, w), tiling, exact, 3, 0, keep=("probs",))
    np.testing.assert_allclose(result.probs, field, atol=1e-5)  # no seam, no shift: the field itself

    def biased(win):  # every tile off by its own constant, as tiles that disagree at their borders
        offset = ((win.y0 // 16 * 7 + win.x0 // 16 * 3) % 5 - 2) * 0.5
        return field[:, win.y0 : win.y1, win.x0 : win.x1] + offset, None

    blended = stitch_tiles((h, w), tiling, biased, 3, 0, keep=("probs",)).probs - field
    hard = np.zeros_like(blended[0])  # each pixel from one tile: seams jump by up to 2.0
    for win in windows(h, w, tiling):
        hard[win.y0 : win.y1, win.x0 : win.x1] = biased(win)[0][0] - field[0, win.y0 : win.y1, win.x0 : win.x1]
    jump = max(np.abs(np.diff(blended[0], axis=0)).max(), np.abs(np.diff(blended[0], axis=1)).max())
    hard_jump = max(np.abs(np.diff(hard, axis=0)).max(), np.abs(np.diff(hard, axis=1)).max())
    assert hard_jump >= 1.0 and jump < 0.2  # smooth transitions over the overlap instead of steps


def test_the_band_stays_one_tile_high_and_rows_leave_in_order() -> None:
    seen: list[tuple[int, int]] = []
    h, w, tiling = 700, 90, make_tiling(65, 16, 8)
    stitcher = Stitcher(h, w, {"probs": 2}, [lambda r0, r1, maps: seen.append((r0, r1))], band=65)
    weights = tile_weights(h, w, tiling)
    starts = sorted({win.y0 for win in windows(h, w, tiling)})
    for win in windows(h, w, tiling):
        if win.row and win.x0 == 0:
            stitcher.finish_rows(starts[win.row])
        stitcher.add(win, {"probs": np.ones((2, *win.size), np.float32)}, *weights[(win.y0, win.x0)])
        assert stitcher.sums["probs"].shape[1] == 65  # never the image height
    stitcher.finish()
    assert seen[0][0] == 0 and seen[-1][1] == h and all(a[1] == b[0] for a, b in zip(seen, seen[1:]))


def test_memory_mapped_stores_live_in_the_scratch_folder_and_are_removed(tmp_path) -> None:
    scratch = Scratch(tmp_path)

    def forward(win):
        return np.full((2, *win.size), 0.5, np.float32), None

    result = stitch_tiles((130, 140), make_tiling(65, 16, 8), forward, 2, 0, keep=("probs",), dtype=np.float16,
                          on_disk=True, scratch=scratch)  # fmt: skip
    assert isinstance(result.probs, np.memmap) and result.probs.dtype == np.float16
    assert float(result.probs.min()) == 0.5 and len(list(tmp_path.glob(".tmp-tiles-*"))) == 1
    scratch.close()
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- exactness


def test_tiled_matches_whole_with_enough_overlap() -> None:
    """>= 99.5% of pixels keep their label; without overlap tile borders show (see README: why not 100%)."""
    image, _ = scene(289, 417)  # padded sides 8k+1 with k a multiple of 4: every scale's grid is exact whole
    cases = (((1.0, 0.75, 0.5), "attention", None), ((1.0, 0.5), "max", None),
             ((1.0, 0.5), "hierarchical", (2.0, 1.0, 0.5)))  # hierarchical: trained on two, run on three
    for trained, merge, run in cases:
        model = local_model(trained, merge)
        scales = run or trained
        whole, whole_att = predict_batch(model, image, scales=run)
        labels = whole.argmax(1)
        quantum = scale_quantum(scales)
        tiled, tiled_att = predict_tiled(model, image, scales=run, tiling=make_tiling(193, 64, quantum))
        assert tiled.shape == whole.shape and tiled_att.shape == whole_att.shape == (1, len(scales), 289, 417)
        agree = (tiled.argmax(1) == labels).float().mean().item()
        assert agree >= 0.995, (scales, merge, agree)
        np.testing.assert_allclose(tiled.sum(1).numpy(), 1.0, atol=1e-5)
        np.testing.assert_allclose(tiled_att.sum(1).numpy(), 1.0, atol=1e-5)
        no_overlap = predict_tiled(model, image, scales=run, tiling=make_tiling(129, 0, quantum))[0]
        assert (no_overlap.argmax(1) == labels).float().mean().item() < agree


def test_tiling_stitches_the_chains_weights_and_ignores_its_gates() -> None:
    """A hierarchical model's output dict also holds "gates" (one map per scale on its own grid, None for the
    highest): tiling stitches "out" and the effective weights only, which match the whole image's."""
    model = local_model((1.0, 0.5), "hierarchical")
    with torch.no_grad():
        for p in model.gate.parameters():  # gates spread over (0, 1): the weights vary over the image
            p.normal_(0, 1)
    image, _ = scene(161, 225)
    assert model(image, scales=(2.0, 1.0, 0.5))["gates"][0] is None
    whole_att = predict_batch(model, image, scales=(2.0, 1.0, 0.5))[1]
    tiled_att = predict_tiled(model, image, scales=(2.0, 1.0, 0.5), tiling=make_tiling(129, 64, scale_quantum((2.0, 1.0, 0.5))))[1]
    assert tiled_att.shape == whole_att.shape and whole_att.std() > 0.05
    assert (tiled_att - whole_att).abs().mean() < 0.02


def test_predict_tiled_of_a_single_scale_model_has_no_attention() -> None:
    model = local_model((1.0,), "avg")
    image, _ = scene(150, 170)
    probs, attention = predict_tiled(model, image, tiling=make_tiling(65, 16, 8))
    assert attention is None and probs.shape == (1, 3, 150, 170) and probs.dtype == torch.float32


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize(
    ("text", "expected"), [("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", int(1.5e9)), ("2000000", 2_000_000)]
)
def test_parse_memory(text, expected) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "4XB", "-1GB", "100"])
def test_parse_memory_refuses_nonsense(text) -> None:
    with pytest.raises(UsageError, match="--max-memory"):
        parse_memory(text)


def test_planner_tiles_only_what_does_not_fit() -> None:
    memory = MemoryModel(width=1.0, num_classes=21, scales=(1.0, 0.75, 0.5), weight_bytes=80 * 2**20)
    fixed = Planner(TilingOptions(tile=513, overlap=128), memory)
    assert fixed.plan(500, 513) is None and fixed.plan(514, 100).tile == 513
    budget = 2 * 2**30
    auto = Planner(TilingOptions(max_memory=budget), memory)
    assert auto.plan(500, 375) is None
    plan = auto.plan(4000, 3000)
    assert plan is not None and plan.tile % 8 == 1 and plan.tile >= 513
    assert memory.tiled_bytes(4000, 3000, plan) <= budget < memory.forward_bytes(4000, 3000)
    bigger = choose_tile(memory, 4000, 3000, 2 * budget)
    assert bigger.tile > plan.tile  # more memory, larger tiles
    with pytest.raises(ResourceError, match="max-memory"):
        choose_tile(memory, 4000, 3000, 50 * 2**20)


def test_estimate_grows_with_width_scales_and_classes() -> None:
    base = MemoryModel(1.0, 21, (1.0,))
    assert MemoryModel(1.0, 21, (2.0, 1.0)).bytes_per_pixel() > base.bytes_per_pixel()
    assert MemoryModel(0.0625, 21, (1.0,)).bytes_per_pixel() < base.bytes_per_pixel()
    assert MemoryModel(0.0625, 200, (1.0,)).bytes_per_pixel() > MemoryModel(0.0625, 21, (1.0,)).bytes_per_pixel()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tile", 500, r"eval.tile must be 8k\+1 pixels"),
        ("tile", 33, "eval.tile must be >= 65"),
        ("overlap", -8, "eval.overlap must be >= 0"),
        ("max_memory", "4XB", "eval.max_memory expected a size such as 4GB"),
        ("max_memory", 4, "eval.max_memory must be a string"),
        ("tiles", 513, "unknown key"),
    ],
)
def test_recipe_eval_tiling_keys_are_checked(key, value, message) -> None:
    from msattn.config.recipe import recipe_from_dict
    from msattn.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({"data": {"root": "d"}, "eval": {key: value}}, source="r.toml")
    recipe = recipe_from_dict({"data": {"root": "d"}, "eval": {"tile": 513, "overlap": 128, "max_memory": "4GB"}},
                              source="r.toml")  # fmt: skip
    assert (recipe.eval.tile, recipe.eval.overlap, recipe.eval.max_memory) == (513, 128, "4GB")
    with pytest.raises(ConfigError, match="eval.overlap .* must leave room"):
        recipe_from_dict({"data": {"root": "d"}, "eval": {"tile": 129, "overlap": 128}}, source="r.toml")
