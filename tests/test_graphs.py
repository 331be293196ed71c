"""Size buckets, the graph cache and the inference runner, on CPU with a stand-in for CUDA graph capture.

The stand-in keeps what matters of a real graph: a static input and static output buffers
that every replay overwrites, so a caller that does not copy its results out is caught.
torch.compile and real CUDA graphs are never used here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _graph_helpers import static_capture

from msattn.geometry import is_grid_side
from msattn.infer import graphs as graphs_module
from msattn.infer.buckets import bucket_side, bucket_size, check_bucket, group_by_key, pad_to_size
from msattn.infer.forward import predict_batch
from msattn.infer.graphs import GraphCache, GraphPolicy, InferenceRunner
from msattn.models.scale import build_model

ON = GraphPolicy(enabled=True)


# ----------------------------------------------------------------------------- buckets


def test_bucket_sides_are_grid_sides_at_multiples_of_the_step() -> None:
    assert bucket_side(505, 64) == 513 and bucket_side(513, 64) == 513 and bucket_side(514, 64) == 577
    assert bucket_side(1, 64) == 65 and bucket_side(321, 32) == 321 and bucket_side(329, 32) == 353
    assert bucket_side(377, 0) == 377  # step 0: no bucket
    for step in (8, 32, 64, 128):
        for side in range(1, 700):
            b = bucket_side(side, step)
            assert b >= side and is_grid_side(b) and (b - 1) % step == 0 and b - side < step + 1


def test_bucket_size_starts_from_the_grid_size_and_pad_to() -> None:
    assert bucket_size((500, 375), 64) == (513, 385)  # grid (505, 377) -> buckets
    assert bucket_size((500, 375), 0) == (505, 377)  # the eager padding of earlier versions
    assert bucket_size((500, 375), 64, pad_to=513) == (513, 513)  # VOC val padded to 513: one shape
    assert bucket_size((600, 375), 64, pad_to=513) == (641, 513)


@pytest.mark.parametrize("step", [-8, 12, 1])
def test_bad_bucket_steps_are_refused(step: int) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        check_bucket(step)
    with pytest.raises(ValueError):
        GraphPolicy(enabled=True, bucket=step)


def test_pad_to_size_pads_bottom_right_and_refuses_to_shrink() -> None:
    x = torch.arange(6.0).view(1, 2, 3)
    padded = pad_to_size(x, (3, 5))
    assert padded.shape == (1, 3, 5) and torch.equal(padded[..., :2, :3], x) and padded[..., 2:, :].abs().sum() == 0
    assert pad_to_size(x, (2, 3)) is x
    with pytest.raises(ValueError, match="smaller"):
        pad_to_size(x, (1, 5))


def test_group_by_key_keeps_first_seen_order() -> None:
    assert group_by_key([3, 10, 4, 12, 5], lambda v: v // 10) == [[3, 4, 5], [10, 12]]


# ----------------------------------------------------------------------------- the cache


class FakeCapture:
    """capture(key, x) -> a replay that returns ``x * 2`` and counts; can be told to fail."""

    def __init__(self, fail: bool = False) -> None:
        self.captured: list[Any] = []
        self.replayed: list[Any] = []
        self.fail = fail

    def __call__(self, key: Any, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nsecond line")
        self.captured.append(key)
        return lambda x: self.replayed.append(key) or x * 2


def eager(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_a_shape_is_captured_the_second_time_it_is_seen_then_replayed() -> None:
    capture = FakeCapture()
    ticks = iter([10.0, 10.5])
    cache = GraphCache(ON, capture, clock=lambda: next(ticks))
    x = torch.ones(2)
    for _ in range(4):
        assert torch.equal(cache.run("a", x, eager), x * 2)
    assert capture.captured == ["a"] and capture.replayed == ["a", "a", "a"]
    s = cache.stats
    assert (s.captures, s.replays, s.eager_calls, s.capture_seconds) == (1, 3, 1, 0.5)
    assert "1 shape(s) captured in 0.50 s once" in cache.summary() and "3 replays, 1 eager" in cache.summary()


def test_one_off_shapes_stay_eager_and_the_cache_is_bounded() -> None:
    capture = FakeCapture()
    cache = GraphCache(GraphPolicy(enabled=True, max_graphs=2, max_captures=3), capture)
    x = torch.ones(1)
    for key in ["once", "a", "a", "b", "b", "c", "c", "a", "a", "a"]:
        cache.run(key, x, eager)
    # a, b captured; c evicts a (least recently used); a comes back but the capture budget (3) is spent
    assert capture.captured == ["a", "b", "c"] and list(cache.graphs) == ["b", "c"]
    assert cache.stats.evictions == 1 and cache.stats.eager_calls == 1 + 3 + 3


def test_a_failed_capture_turns_graphs_off_and_says_why() -> None:
    cache = GraphCache(ON, FakeCapture(fail=True))
    x = torch.ones(1)
    for _ in range(3):
        assert torch.equal(cache.run("a", x, eager), x * 2)
    assert not cache.active and cache.stats.eager_calls == 3
    line = cache.summary()
    assert "capture failed (RuntimeError: operation not permitted" in line and "second line" not in line


def test_policy_off_is_always_eager_and_silent() -> None:
    capture = FakeCapture()
    cache = GraphCache(GraphPolicy(enabled=False), capture)
    for _ in range(3):
        cache.run("a", torch.ones(1), eager)
    assert capture.captured == [] and cache.summary() is None


def test_graphs_are_on_by_default_for_cuda_only() -> None:
    assert GraphPolicy.for_device(torch.device("cuda")).enabled
    assert not GraphPolicy.for_device(torch.device("cuda"), compile_graphs=False).enabled
    assert not GraphPolicy.for_device(torch.device("cpu")).enabled
    assert GraphPolicy.for_device(torch.device("cuda"), bucket=32).bucket == 32


# ----------------------------------------------------------------------------- the runner


def tiny(merge: str = "attention", scales: tuple[float, ...] = (1.0, 0.5)) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(3, scales=scales, merge=merge, width=1 / 16, pool5a=False).eval()


def images(*sizes: tuple[int, int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(3, h, w, generator=gen) for h, w in sizes]


def test_policy_off_is_exactly_predict_batch() -> None:
    model = tiny()
    runner = InferenceRunner(model, flip=True, capture=FakeCapture(fail=True))
    batch = images((40, 37), (40, 37))
    results = runner.predict(batch)
    probs, attention = predict_batch(model, torch.stack(batch), flip=True)
    for i, (p, a) in enumerate(results):
        assert torch.equal(p, probs[i]) and torch.equal(a, attention[i])
    assert runner.group_key((40, 37)) == (40, 37) and runner.summary() is None


@pytest.mark.parametrize(
    ("merge", "flip", "scales"),
    [("attention", False, None), ("attention", True, None), ("max", True, None), ("avg", False, None),
     ("hierarchical", True, (2.0, 1.0, 0.5))],
)  # fmt: skip
def test_graphs_give_what_eager_gives_on_the_bucket(merge: str, flip: bool, scales: tuple[float, ...] | None) -> None:
    """Mixed sizes of one bucket, batched: each result is the eager prediction padded to the bucket."""
    model = tiny(merge)
    keys: list = []
    runner = InferenceRunner(model, scales=scales, flip=flip, policy=ON)
    runner.cache.capture = static_capture(runner, keys)
    batch = images((40, 40), (33, 50), (60, 21))
    assert {runner.group_key(img.shape[-2:]) for img in batch} == {(65, 65)}
    for _ in range(3):  # eager, capture + replay, replay
        results = runner.predict(batch)
        for img, (p, a) in zip(batch, results):
            ref_p, ref_a = predict_batch(model, img[None], scales=scales, flip=flip, pad_to=65)
            assert p.shape == ref_p[0].shape and torch.allclose(p, ref_p[0], atol=1e-6)
            assert torch.allclose(a, ref_a[0], atol=1e-6)
            assert torch.allclose(p.sum(0), torch.ones_like(p[0]), atol=1e-5)
    assert keys == [(3, 65, 65)]
    runs = 3 * (2 if flip else 1)  # the mirrored batch has the same shape: with flip it is the second use
    assert runner.cache.stats.eager_calls == 1 and runner.cache.stats.replays == runs - 1


def test_single_scale_has_no_attention_and_big_buckets_get_smaller_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graphs_module, "BATCH_PIXELS", 2 * 65 * 65)
    model = tiny("avg", scales=(1.0,))
    keys: list = []
    runner = InferenceRunner(model, policy=ON)
    runner.cache.capture = static_capture(runner, keys)
    batch = images(*[(50, 50)] * 5)
    for _ in range(2):
        results = runner.predict(batch)
    assert len(results) == 5 and all(a is None for _, a in results)
    # batches of 2, 2 and 1 per call: the 2 is captured at its second use, the 1 in the second call
    assert keys == [(2, 65, 65), (1, 65, 65)] and runner.cache.stats.eager_calls == 2


def test_one_batch_must_share_a_bucket() -> None:
    runner = InferenceRunner(tiny(), policy=ON)
    with pytest.raises(ValueError, match="share a size bucket"):
        runner.predict(images((40, 40), (70, 40)))
