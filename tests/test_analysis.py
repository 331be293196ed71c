"""msattn analyze on hand-made cases whose answers are known (tests/analysis_helpers.py)."""

from __future__ import annotations

import math

import pytest
import torch
from analysis_helpers import CLASSES, STUB_MODEL_ARGS, StubScaleModel, expected_counts, make_items
from rich.console import Console

from msattn.analysis import run as analysis_run
from msattn.analysis.accumulate import Accumulator
from msattn.analysis.methods import BatchMaps, Method, build_methods
from msattn.analysis.objects import bin_labels, check_bins, find_objects
from msattn.analysis.summary import calibration, pareto_front
from msattn.errors import UsageError


def _job(merge: str = "attention", **settings):
    settings = analysis_run.Settings(batch_size=2, gallery=1, **settings)
    return analysis_run.job_for_model(StubScaleModel(merge), make_items(), list(CLASSES), settings,
                                      torch.device("cpu"), model_args=dict(STUB_MODEL_ARGS, merge=merge))


def _report(job, out):
    console = Console(quiet=True)
    state = analysis_run.run_pass(job, out, console)
    return analysis_run.build_report(job, state, None)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _report(_job(), tmp_path_factory.mktemp("analysis"))


def _method(report, key):
    return next(m for m in report["methods"] if m["key"] == key)


def test_methods_cover_every_subset_the_merge_allows() -> None:
    keys = [m.key for m in build_methods((1.0, 0.75, 0.5), "attention")]
    assert keys == ["scale:1", "scale:0.75", "scale:0.5", "max:1+0.75", "avg:1+0.75", "max:1+0.5", "avg:1+0.5",
                    "max:0.75+0.5", "avg:0.75+0.5", "max:1+0.75+0.5", "avg:1+0.75+0.5", "attention:1+0.75+0.5",
                    "oracle:1+0.75+0.5"]
    assert "attention:1+0.5" not in [m.key for m in build_methods((1.0, 0.5), "max")]


def test_branches_oracle_and_merges_come_out_as_constructed(report) -> None:
    n = expected_counts()
    total = n["background"] + n["right2"] + n["right1"]
    assert _method(report, "scale:2")["pixel_accuracy"] == pytest.approx((n["background"] + n["right2"]) / total)
    assert _method(report, "scale:1")["pixel_accuracy"] == pytest.approx((n["background"] + n["right1"]) / total)
    for key in ("attention:2+1", "oracle:2+1"):
        assert _method(report, key)["miou"] == pytest.approx(1.0)
        assert _method(report, key)["pixel_accuracy"] == pytest.approx(1.0)
    for key in ("max:2+1", "avg:2+1"):  # scale 2's scores are larger: both merges follow it
        assert _method(report, key)["per_class"] == _method(report, "scale:2")["per_class"]
    assert report["model"] == "attention:2+1" and _method(report, "attention:2+1")["is_model"]
    assert report["merge_gain"]["best_single"] == max(("scale:2", "scale:1"), key=lambda k: _method(report, k)["miou"])


def test_size_bins_weights_and_gains_come_out_as_constructed(report) -> None:
    bins = {b["label"]: b for b in report["size_bins"]["bins"]}
    assert list(bins) == ["<0.5%", "0.5-2%", "2-8%", "8-32%", ">=32%"]
    small, medium, large = bins["<0.5%"], bins["2-8%"], bins[">=32%"]
    assert (small["objects"], medium["objects"], large["objects"]) == (5, 5, 2)
    assert bins["0.5-2%"]["objects"] == bins["8-32%"]["objects"] == 0
    assert small["weight_mean"] == pytest.approx([0.9, 0.1])
    assert medium["weight_mean"] == pytest.approx([(3 * 0.9 + 2 * 0.1) / 5, (3 * 0.1 + 2 * 0.9) / 5])
    assert large["weight_mean"] == pytest.approx([0.1, 0.9])
    assert small["accuracy"]["scale:2"] == 1.0 and small["accuracy"]["scale:1"] == 0.0
    assert large["accuracy"]["scale:2"] == 0.0 and large["accuracy"]["scale:1"] == 1.0
    assert medium["accuracy"]["scale:2"] == pytest.approx(0.6) and medium["accuracy"]["scale:1"] == pytest.approx(0.4)
    assert (small["gain"], large["gain"]) == (0.0, 0.0)
    assert medium["gain"] == pytest.approx(0.4) and medium["best_single"] == "scale:2"
    corr = report["size_bins"]["weight_size_correlation"]
    assert corr["2"] < -0.5 and corr["1"] > 0.5  # the larger input's weight falls as objects grow


def test_attention_by_class_and_entropy(report) -> None:
    by_class = report["attention_by_class"]["classes"]
    assert by_class["background"]["mean"] == pytest.approx([0.5, 0.5])
    assert by_class["background"]["std"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert by_class["background"]["entropy"] == pytest.approx(1.0)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    assert by_class["red"]["entropy"] == pytest.approx(h)
    ent = report["attention_entropy"]
    assert 0 < ent["mean"] < 1 and ent["near_one_hot_share"] == 0.0
    n = expected_counts()  # score spread: 0 on background, log(0.9 / 0.1) = 2.2 on objects (steps of 1)
    hist = ent["score_gap"]["histogram"]
    assert hist[0] == n["background"] and hist[2] == n["right1"] + n["right2"] and sum(hist) == sum(n.values())


def test_pareto_marks(report) -> None:
    rows = {m["key"]: m for m in report["methods"]}
    assert rows["scale:1"]["gflops"] < rows["scale:2"]["gflops"] < rows["max:2+1"]["gflops"]
    assert rows["max:2+1"]["gflops"] < rows["attention:2+1"]["gflops"]
    assert rows["attention:2+1"]["pareto"] and rows["scale:1"]["pareto"]
    assert not rows["max:2+1"]["pareto"] and not rows["avg:2+1"]["pareto"]  # as good as scale 2, dearer
    assert rows["scale:2"]["pareto"] == (rows["scale:2"]["miou"] > rows["scale:1"]["miou"])
    assert rows["oracle:2+1"]["pareto"] is None and rows["oracle:2+1"]["gflops"] is None
    assert pareto_front([(0.5, 1.0), (0.6, 2.0), (0.55, 3.0), (0.6, 2.0), (None, 1.0)]) == [True, True, False, True, None]


def test_expected_calibration_error_on_a_constructed_case() -> None:
    methods = [Method("scale", (1.0,))]
    acc = Accumulator(methods, methods[0], num_classes=2, num_scales=1)
    labels = torch.zeros(1, 10, 10, dtype=torch.int64)
    pred = torch.zeros(1, 10, 10, dtype=torch.int64)
    pred[0, :3] = 1  # 30 wrong among the 50 pixels at confidence 0.9 (rows 0-4)
    pred[0, 5] = 1  # 10 wrong among the 50 at confidence 0.5 (rows 5-9)
    conf = torch.full((1, 10, 10), 0.9)
    conf[0, 5:] = 0.5
    maps = BatchMaps({"scale:1": pred}, {"scale:1": conf}, None, None, None)
    acc.update(maps, labels, ["a"], (10, 10))
    state = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in acc.state_dict().items()}
    cal = calibration(state, ["scale:1"])["maps"]["scale:1"]
    # bin of 0.9: 50 pixels, accuracy 20/50 = 0.4, gap 0.5; bin of 0.5: 50 pixels, accuracy 40/50, gap 0.3
    assert cal["ece"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.3)
    filled = [b for b in cal["bins"] if b["count"]]
    assert [(b["count"], b["accuracy"]) for b in filled] == [(50, pytest.approx(0.8)), (50, pytest.approx(0.4))]
    assert [b["confidence"] for b in filled] == [pytest.approx(0.5), pytest.approx(0.9)]


def test_objects_are_connected_components_per_class() -> None:
    label = torch.tensor([[1, 1, 0, 2], [0, 0, 0, 2], [1, 0, 255, 0], [1, 0, 2, 2]]).numpy()
    objects = find_objects(label, 3, skip_classes=(0,))
    assert sorted(zip(objects.classes.tolist(), objects.pixels.tolist())) == [(1, 2), (1, 2), (2, 2), (2, 2)]
    assert (objects.pixel_object[label == 0] == -1).all() and objects.pixel_object[2, 2] == -1
    assert bin_labels(check_bins([0.01, 0.1])) == ["<1%", "1-10%", ">=10%"]
    for bad in ([], [0.1, 0.05], [0.0, 0.5], [0.5, 1.0]):
        with pytest.raises(UsageError, match="--bins"):
            check_bins(bad)


def test_resume_gives_the_report_of_one_pass(tmp_path, monkeypatch, report) -> None:
    job = _job()
    monkeypatch.setattr(analysis_run, "SAVE_EVERY_S", -1.0)  # save after every batch
    real = analysis_run.forward_maps
    calls = {"n": 0}

    def dies_on_the_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis_run, "forward_maps", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _report(job, tmp_path)
    monkeypatch.setattr(analysis_run, "forward_maps", real)
    job = _job()
    resumed = _report(job, tmp_path)
    assert job.model.calls == 1  # only the second batch of two images was run again
    for key in ("methods", "size_bins", "attention_by_class", "calibration", "attention_entropy", "merge_gain"):
        assert resumed[key] == report[key], key
    again = _job()
    _report(again, tmp_path)
    assert again.model.calls == 0  # a finished pass is reused


def test_other_settings_start_the_pass_over(tmp_path) -> None:
    _report(_job(), tmp_path)
    job = _job(bins=(0.01, 0.1))
    other = _report(job, tmp_path)
    assert job.model.calls == 2 and other["size_bins"]["labels"] == ["<1%", "1-10%", ">=10%"]


@pytest.mark.parametrize("merge", ["max", "avg"])
def test_max_and_avg_models(tmp_path, merge) -> None:
    rep = _report(_job(merge), tmp_path)
    assert rep["model"] == f"{merge}:2+1"
    assert "attention:2+1" not in [m["key"] for m in rep["methods"]]
    assert rep["attention_entropy"] is not None if merge == "max" else True


def test_latency_comes_from_the_matching_bench_record(tmp_path) -> None:
    from msattn.analysis.costs import method_costs

    methods = build_methods((1.0, 0.5), "attention")
    records = [
        {"mode": "inference", "scales": [1.0], "merge": None, "size": 321, "width": 0.0625, "latency_ms": 10.0},
        {"mode": "inference", "scales": [1.0], "merge": None, "size": 513, "width": 0.0625, "latency_ms": 30.0},
        {"mode": "inference", "scales": [1.0, 0.5], "merge": "attention", "size": 321, "width": 0.0625,
         "latency_ms": 14.0},
        {"mode": "train", "scales": [1.0, 0.5], "merge": "max", "size": 321, "width": 0.0625, "latency_ms": 99.0},
        {"mode": "inference", "scales": [1.0, 0.5], "merge": "avg", "size": 321, "width": 1.0, "latency_ms": 99.0},
    ]
    args = dict(STUB_MODEL_ARGS, scales=[1.0, 0.5])
    costs = method_costs(args, methods, {"337x337": 2}, records)
    assert costs["scale:1"]["latency_ms"] == 10.0  # the size nearest the images'
    assert costs["attention:1+0.5"]["latency_ms"] == 14.0
    assert "latency_ms" not in costs["max:1+0.5"] and "latency_ms" not in costs["avg:1+0.5"]  # train mode, other width
    assert "latency_ms" not in costs["scale:0.5"] and "oracle:1+0.5" not in costs
    assert costs["scale:0.5"]["gflops"] < costs["scale:1"]["gflops"] < costs["attention:1+0.5"]["gflops"]
