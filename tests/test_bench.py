"""msattn bench: runs through the real CLI on a tiny network and writes valid JSON (never asserts speed)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from msattn.bench.cases import area_ratio, scale_merge_pairs
from msattn.bench.measure import MemoryProbe
from msattn.bench.model import add_ratios

TINY = ["--width", "0.0625", "--iters", "1", "--warmup", "0"]
REQUIRED = ("mode", "scales", "merge", "size", "device", "latency_ms", "images_per_s", "gflops", "peak_mem_mb")


def read_records(path: Path) -> list[dict]:
    records = json.loads(path.read_text())
    assert isinstance(records, list) and records
    for record in records:
        missing = [key for key in REQUIRED if key not in record]
        assert not missing, (missing, record)
        assert record["device"] == "cpu"
        assert all(isinstance(s, float) for s in record["scales"])
        assert record["latency_ms"] > 0 and math.isclose(record["images_per_s"], 1000 / record["latency_ms"])
    return records


def test_inference_and_train_cover_every_scale_set_and_merge(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code, stdout, stderr = run_cli("bench", *TINY, "--size", "33", "--mode", "inference", "--mode", "train",
                                   "--json", out)
    assert code == 0, stderr
    records = read_records(out)
    for mode in ("inference", "train"):
        expected = [(list(s), m) for s, m in scale_merge_pairs(mode)]
        assert expected[0] == ([1.0], None) and len(expected) == (9 if mode == "inference" else 8)
        assert (([1.0, 0.75, 0.5], "hierarchical") in expected) == (mode == "inference")  # it trains on two
        rows = [r for r in records if r["mode"] == mode]
        assert [(r["scales"], r["merge"]) for r in rows] == expected
        assert all(r["size"] == 33 and r["width"] == 0.0625 and r["gflops"] > 0 for r in rows)
        assert all(r["peak_mem_mb"] is None or r["peak_mem_mb"] > 0 for r in rows)
        single = rows[0]
        for row in rows[1:]:
            rounds = [t / b for t, b in zip(row["times_ms"], single["times_ms"])]
            assert len(rounds) == 1 and row["latency_ratio"] == pytest.approx(rounds[0])
            assert row["flop_ratio"] == pytest.approx(row["gflops"] / single["gflops"])
            assert row["flop_ratio"] > 1 and row["area_ratio"] == pytest.approx(area_ratio(row["scales"]))
        by_merge = {r["merge"]: r["gflops"] for r in rows if len(r["scales"]) == 3}
        assert by_merge["max"] == pytest.approx(by_merge["avg"]) and by_merge["attention"] > by_merge["max"]
    inference = {(tuple(r["scales"]), r["merge"]): r["gflops"] for r in records if r["mode"] == "inference"}
    for r in records:
        if r["mode"] == "train":  # forward + backward: about three forwards (no input gradient)
            assert 2.0 < r["gflops"] / inference[(tuple(r["scales"]), r["merge"])] < 3.1
    assert all(r["matmul_gflops_s"] > 0 and r["peak_fraction"] > 0 for r in records)
    assert "matmul timed in the same rounds" in stdout and "attention" in stdout


def test_data_mode_and_amp_refused_on_cpu(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    code, stdout, stderr = run_cli("bench", *TINY, "--size", "40", "--mode", "data", "--amp", "--json", out)
    assert code == 0, stderr
    assert "--amp ignored on CPU" in stderr
    records = read_records(out)
    assert [r["stage"] for r in records] == ["prepare_demo", "decode_augment"]
    for record in records:
        assert record["mode"] == "data" and record["scales"] == [] and record["amp"] is False
        assert record["size"] == 40 and record["images"] >= 1 and record["gflops"] is None
    assert "worker" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "fast"], "unknown mode"),
        (["--size", "4"], "at least 8 pixels"),
        (["--device", "tpu"], "--device tpu"),
    ],
)
def test_bad_options_are_usage_errors(run_cli, args: list[str], message: str) -> None:
    code, _, stderr = run_cli("bench", *TINY, *args)
    assert code == 2 and message in stderr and "Traceback" not in stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(run_cli) -> None:
    code, _, stderr = run_cli("bench", *TINY, "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in stderr


def test_ratios_use_the_single_scale_row_of_the_same_mode_and_size() -> None:
    def row(mode: str, size: int, scales: list[float], latency: float, gflops: float) -> dict:
        return {"mode": mode, "size": size, "scales": scales, "latency_ms": latency, "gflops": gflops}

    records = [
        row("inference", 321, [1.0], 100.0, 10.0),
        row("inference", 321, [1.0, 0.75, 0.5], 230.0, 23.0),
        row("inference", 513, [1.0], 300.0, 25.0),
        row("inference", 513, [1.0, 0.5], 450.0, 32.0),
        row("train", 321, [1.0], 50.0, 30.0),
        row("train", 321, [1.0, 0.5], 80.0, 39.0),
        {"mode": "data", "size": 321, "scales": [], "latency_ms": 5.0, "gflops": None},
    ]
    add_ratios(records)
    assert records[1]["latency_ratio"] == pytest.approx(2.3) and records[1]["flop_ratio"] == pytest.approx(2.3)
    assert records[1]["area_ratio"] == pytest.approx(1.8125)
    assert records[3]["latency_ratio"] == pytest.approx(1.5) and records[3]["flop_ratio"] == pytest.approx(1.28)
    assert records[5]["latency_ratio"] == pytest.approx(1.6) and records[5]["area_ratio"] == pytest.approx(1.25)
    assert "latency_ratio" not in records[6]


def test_ratios_compare_cases_within_each_round() -> None:
    """Load that comes and goes between rounds must not leak into the ratio."""
    single = {"mode": "inference", "size": 65, "scales": [1.0], "gflops": 1.0, "latency_ms": 300.0,
              "latency_ms_min": 100.0, "times_ms": [100.0, 300.0, 300.0]}
    multi = {"mode": "inference", "size": 65, "scales": [1.0, 0.5], "gflops": 1.3, "latency_ms": 230.0,
             "latency_ms_min": 230.0, "times_ms": [230.0, 230.0, 690.0]}
    add_ratios([single, multi])
    assert multi["latency_ratio"] == pytest.approx(2.3)  # rounds: 2.3, 0.77, 2.3
    assert multi["latency_ratio_min"] == pytest.approx(2.3) and multi["flop_ratio"] == pytest.approx(1.3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak RSS is read from Linux /proc")
def test_cpu_memory_probe_sees_a_64_mb_allocation() -> None:
    probe = MemoryProbe(torch.device("cpu"))
    with probe.measure():
        block = torch.ones(16 * 2**20)  # 64 MiB, touched
        del block
    if probe.peak_bytes is None:
        pytest.skip(f"peak RSS cannot be reset here: {probe.kind}")
    assert 60 * 2**20 < probe.peak_bytes < 200 * 2**20


# ----------------------------------------------------------------------------- issue 18: progress, width, e2e


def test_progress_goes_to_stderr_and_every_table_fits_100_columns(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "all.json"
    code, stdout, stderr = run_cli("bench", *TINY, "--size", "33", "--batch", "2", "--mode", "inference", "--mode",
                                   "train", "--mode", "data", "--mode", "train-e2e", "--workers", "0", "--json", out)
    assert code == 0, stderr
    progress = [line for line in stderr.splitlines() if line.startswith("bench: ")]
    for expected in ("building case 9/9", "round 1/1 (timed)", "memory and FLOPs, case 9/9", "decode + augment",
                     "train-e2e 33 {1, 0.75, 0.5} attention: 0 loader worker(s)"):
        assert any(expected in line for line in progress), (expected, progress)
    assert max(len(line) for line in stdout.splitlines()) <= 100
    headers = [line.split() for line in stdout.splitlines() if line.startswith("scales") or line.startswith("stage")]
    assert ["scales", "merge", "ms/img", "img/s", "GFLOP/img", "of", "peak", "mem", "MB", "time", "x1", "FLOPs", "x1",
            "gap"] in headers
    assert ["scales", "merge", "workers", "img/s", "data", "wait", "decode", "img/s", "mem", "MB"] in headers
    assert "…" not in stdout  # nothing cut short
    records = read_records(out)
    assert [r["mode"] for r in records].count("inference") == 9 and {r["graph"] for r in records
                                                                    if r["mode"] == "inference"} == {False}


def test_train_e2e_runs_the_real_loader_and_step(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    code, stdout, stderr = run_cli("bench", "--width", "0.0625", "--iters", "2", "--warmup", "1", "--size", "33",
                                   "--batch", "2", "--mode", "train-e2e", "--case", "1", "--json", out)
    assert code == 0, stderr
    (record,) = read_records(out)
    assert record["mode"] == "train-e2e" and record["scales"] == [1.0] and record["workers_setting"] == "auto"
    assert record["workers"] == (1 if len(__import__("os").sched_getaffinity(0)) > 1 else 0)
    assert "data.workers = auto" in record["workers_reason"] and record["decode_images_per_s"] > 0
    assert 0.0 <= record["data_wait"] <= 1.0 and record["images_per_s"] > 0 and record["image_side"] == 49
    assert "train-e2e 33: data.workers = auto" in stdout


def test_case_filter_and_bad_cases_or_workers(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    code, _, stderr = run_cli("bench", *TINY, "--size", "33", "--mode", "inference", "--case", "1", "--case",
                              "1,0.5:max", "--graph", "--json", out)
    assert code == 0, stderr
    assert "--graph ignored on CPU" in stderr
    records = read_records(out)
    assert [(r["scales"], r["merge"]) for r in records] == [([1.0], None), ([1.0, 0.5], "max")]
    assert records[1]["latency_ratio"] > 0 and records[1]["capture_s"] is None
    code, _, stderr = run_cli("bench", *TINY, "--size", "33", "--mode", "inference", "--case", "2,1:attention",
                              "--case", "1", "--case", "1", "--json", out)  # one case outside the standard sets
    assert code == 0, stderr
    assert [(r["scales"], r["merge"]) for r in read_records(out)] == [([1.0], None), ([2.0, 1.0], "attention")]
    for args, message in ((["--case", "1,0.5"], "name the merge"), (["--case", "one"], "expected scales"),
                          (["--mode", "train-e2e", "--workers", "many"], "--workers many")):
        code, _, stderr = run_cli("bench", *TINY, "--size", "33", *args)
        assert code == 2 and message in stderr and "Traceback" not in stderr


def test_inference_cases_are_replayed_from_a_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-graph path of the bench, with a CPU stand-in for the capture."""
    import msattn.bench.model as bench_model
    from msattn.bench.cases import Settings
    from msattn.bench.measure import probe_case

    captured = []

    def fake_capture(fn, example, pool=None, warmup=2):
        captured.append(tuple(example.shape))
        static = example.clone()
        return lambda x: fn(static.copy_(x))

    monkeypatch.setattr(bench_model, "capture_cuda_graph", fake_capture)
    settings = Settings(torch.device("cpu"), 1, False, False, True, 0.0625, 1, 0, graph=True,
                              cases=((((1.0, 0.5)), "attention"),))
    (case,) = bench_model.build_cases("inference", 33, settings)
    assert captured == [(1, 3, 33, 33)] and case.capture_s is not None and case.step is not case.eager_step
    case.step()
    probe = probe_case(case, settings)
    assert probe["flops"] > 0
