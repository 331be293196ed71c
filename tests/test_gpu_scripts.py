"""benchmarks/gpu_check.sh (with profile_train_step.py and gpu_checks.py) runs end to end on CPU.

A GPU session has minutes of device time: the script it runs must not fail on a typo. Here it
runs with tiny settings on CPU (no torch.compile) and every file it promises is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msattn.bench.cases import scale_merge_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_writes_every_file_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    env = {**os.environ, "DEVICE": "cpu", "WIDTH": "0.0625", "INF_SIZE": "33", "TRAIN_SIZE": "33", "BATCH": "2",
           "ITERS": "2", "WARMUP": "0", "SKIP_COMPILE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["checks.json", "gpu_check.log", "inference-33.json", "loader-33.json", "profile-train-33.json",
                     "profile-train-33.trace.json.gz", "train-33.json"]
    inference = json.loads((out / "inference-33.json").read_text())
    cases = len(scale_merge_pairs("inference"))  # every default case (9, hierarchical included), eager and graph
    assert len(inference) == 2 * cases and all(r["mode"] == "inference" and r["graph"] is False for r in inference)
    assert {r["mode"] for r in json.loads((out / "train-33.json").read_text())} == {"train"}
    loader = json.loads((out / "loader-33.json").read_text())
    assert [r["mode"] for r in loader] == ["data", "data", "train-e2e", "train-e2e"]
    profile = json.loads((out / "profile-train-33.json").read_text())
    assert profile["device_ms_per_step"] > 0 and 0 < profile["conv_share"] <= 1 and profile["top_kernels"]
    checks = json.loads((out / "checks.json").read_text())
    assert checks["ok"] is True and checks["normalize"]["ok"] is True
    assert set(checks["runner_speed"]) >= {"batch1_eager", "batch1_graph", "batch8_eager", "batch8_graph"}
    log = (out / "gpu_check.log").read_text()
    assert "== inference-eager:" in log and "== checks:" in log and "FAILED" not in log


@pytest.mark.slow
def test_gpu_check_script_stops_at_the_first_failure(tmp_path: Path) -> None:
    env = {**os.environ, "DEVICE": "cpu", "WIDTH": "7", "PYTHON": sys.executable}  # --width 7: a usage error
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "gpu")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "== inference-eager FAILED" in result.stdout
    assert not (tmp_path / "gpu" / "train-321.json").exists()
