"""README's documented numbers stay bound to the code: docs/check_readme.py's claims, and what README's commands leave.

The demos themselves run in CI (``python docs/check_readme.py``, minutes); here, in seconds: every
claim's sentence is still in its document, the claims that need no run (geometry) hold, a moved
number is caught and ``--update`` writes it, and every claim computes from a report of the real shape.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_check() -> Any:
    spec = importlib.util.spec_from_file_location("check_readme", ROOT / "docs" / "check_readme.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_readme"] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


check = _load_check()


def test_every_claim_is_in_its_document_and_the_geometry_claims_hold() -> None:
    """README says a 96-px demo image gives a 13x13 map, and so does recipes/demo.toml (it said 12x12)."""
    findings = check.compare(None)
    assert len(findings) >= 20 and {f.claim.doc for f in findings} >= {"README.md", "docs/attention-collapse.md",
                                                                       "recipes/demo.toml"}  # fmt: skip
    missing = [f.claim.text for f in findings if f.written is None]
    assert not missing, missing
    static = [f for f in findings if not f.claim.needs_runs]
    assert static and all(f.written == f.measured for f in static), [(f.written, f.measured) for f in static]
    assert ("97", "13", "13") in [f.measured for f in static]


def _bin(label: str, objects: int, w2: float, acc: tuple[float, float]) -> dict[str, Any]:
    keys = ["scale:2", "scale:1", "max:2+1", "avg:2+1", "attention:2+1", "oracle:2+1"]
    return {"label": label, "objects": objects, "weight_mean": [w2, 1 - w2] if objects else None,
            "accuracy": dict(zip(keys, [*acc, 0.5, 0.5, 0.5, 0.9])) if objects else None}  # fmt: skip


def fake_runs() -> dict[str, Any]:
    """eval.json and report.json as msattn train and msattn analyze write them (the keys the claims read)."""
    labels = ["<0.5%", "0.5-2%", "2-8%", "8-32%", ">=32%"]
    runs = {}
    for name, filled in (("demo", 4), ("demo-scales", 5)):
        methods = [{"key": k, "miou": v, "gflops": g} for k, v, g in (
            ("scale:2", 0.6815, 0.6), ("scale:1", 0.5208, 0.16), ("max:2+1", 0.6493, 0.76), ("avg:2+1", 0.6564, 0.76),
            ("attention:2+1", 0.6833, 0.95), ("oracle:2+1", 0.7678, None))]  # fmt: skip
        report = {"scales": [2.0, 1.0], "model": "attention:2+1", "methods": methods, "provenance": {"images": 60},
                  "size_bins": {"objects": 853, "weight_size_correlation": {"2": -0.24, "1": 0.24},
                                "bins": [_bin(b, 10 * (i < filled), 0.99 - 0.1 * i, (0.49, 0.16))
                                         for i, b in enumerate(labels)]},
                  "calibration": {"maps": {"attention:2+1": {"ece": 0.0035}}},
                  "attention_entropy": {"mean": 0.14, "near_one_hot_share": 0.48,
                                        "score_gap": {"median": 5.0, "p90": 8.0}}}  # fmt: skip
        per_class = dict(zip(["background", "head", "torso", "arms", "legs"], [0.9476, 0.576, 0.7377, 0.5072, 0.6483]))
        runs[name] = {"report": report, "eval": {"miou": 0.6833, "pixel_accuracy": 0.943, "per_class": per_class,
                                                 "num_images": 60}}  # fmt: skip
    return runs


def test_every_claim_computes_from_reports_of_the_real_shape() -> None:
    for finding in check.compare(fake_runs()):
        assert finding.measured is not None and len(finding.measured) == len(finding.written), finding.claim.text
        assert all(re.fullmatch(check.NUMBER, value) for value in finding.measured), finding.measured


def test_a_moved_number_fails_and_update_writes_the_measured_one(tmp_path: Path, capsys) -> None:
    (tmp_path / "README.md").write_text("It reaches 46.8% mIoU,\na harder task. Cost: scale 1 (0.16 GFLOPs).\n")
    claim = check.Claim("README.md", "It reaches {}% mIoU, a harder task", lambda r: (f"{r['miou']:.1f}",))
    gone = check.Claim("README.md", "It reached {}%", lambda r: ("1",))
    (finding, lost) = check.compare({"miou": 48.23}, [claim, gone], root=tmp_path)
    assert finding.written == ("46.8",) and finding.measured == ("48.2",) and finding.differs(0.0)
    assert not finding.differs(1.5) and lost.written is None and lost.differs(0.0)
    assert check.report_findings([finding, lost], 0.0) == 2
    err = capsys.readouterr().err
    assert "written  46.8" in err and "measured 48.2" in err and "not in the document" in err
    assert check.update([finding, lost], root=tmp_path) == ["README.md"]
    assert (tmp_path / "README.md").read_text() == "It reaches 48.2% mIoU,\na harder task. Cost: scale 1 (0.16 GFLOPs).\n"
    (again,) = check.compare({"miou": 48.23}, [claim], root=tmp_path)
    assert not again.differs(0.0)


def test_readme_points_the_first_look_at_the_validation_images() -> None:
    """The first command after the demo predicts data/demo/val.txt (60 images the model never saw), not all 300."""
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quick start"):readme.index("### What the demo's attention does")]
    (predict,) = [line for line in quick.splitlines() if line.startswith("msattn predict ")]
    assert predict.split()[2] == "data/demo/val.txt"
    assert "predictions/val_00000_attention.png" in quick and "train_00000" not in quick
    assert "--overwrite" in quick and "--out runs/demo2" in quick  # what to do when the line runs twice


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and a checkout")
def test_what_readmes_commands_write_is_ignored_by_git() -> None:
    written = ["report/index.html", "report-scales/report.json", "voc.onnx", "runs/demo/last.pt", "data/demo/val.txt",
               "predictions/val_00000.png", "resolved.toml"]  # fmt: skip
    result = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True,
                            check=False)  # fmt: skip
    ignored = result.stdout.split()
    assert sorted(ignored) == sorted(written), sorted(set(written) - set(ignored))
