"""msattn analyze end to end on a tiny trained checkpoint: files, self-contained HTML, documented JSON, errors."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from engine_helpers import make_tiny_dataset, write_recipe

README = Path(__file__).resolve().parents[1] / "README.md"
ODD_CLASS = "<b>red</b> [bold]x"  # must reach the page escaped and the terminal verbatim


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from msattn.train.loop import train_from_recipe

    root = tmp_path_factory.mktemp("analyze")
    data = make_tiny_dataset(root / "tiny", num_train=4, num_val=3, size=40)
    info = json.loads((data / "dataset.json").read_text())
    info["classes"][1] = ODD_CLASS
    (data / "dataset.json").write_text(json.dumps(info))
    recipe = write_recipe(root / "tiny.toml", data, train={"iterations": 4, "val_every": 0, "log_every": 2})
    train_from_recipe(recipe, [], out=root / "run", device="cpu")
    return root / "run" / "last.pt"


def _documented_keys() -> set[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### report.json") :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return set(re.findall(r"`([a-z_0-9]+)`", section))


def test_analyze_writes_a_self_contained_page_and_a_documented_json(trained: Path, tmp_path: Path, run_cli) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep[bold]x"
    code, stdout, stderr = run_cli("analyze", "--checkpoint", trained, "--out", out, "--json", tmp_path / "r.json",
                                   "--gallery", "1", "--bins", "0.05", "--bins", "0.2", "--device", "cpu")
    assert code == 0, stderr
    assert f"report: {out / 'index.html'}" in stdout  # paths print verbatim, not as markup
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 4
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the page
    assert "&lt;b&gt;red&lt;/b&gt;" in page and ODD_CLASS not in page
    report = json.loads((out / "report.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text())["methods"] == report["methods"]
    prov = report["provenance"]
    assert prov["checkpoint"] == str(trained) and prov["iteration"] == 4 and len(prov["checkpoint_sha256"]) == 64
    assert report["size_bins"]["labels"] == ["<5%", "5-20%", ">=20%"]
    assert {m["key"] for m in report["methods"]} == {"scale:1", "scale:0.5", "max:1+0.5", "avg:1+0.5",
                                                     "attention:1+0.5", "oracle:1+0.5"}
    documented = _documented_keys()
    keys = set(report) | set(prov) | set(report["methods"][0]) | set(report["size_bins"])
    keys |= set(report["size_bins"]["bins"][0]) | set(report["calibration"]) | set(report["attention_entropy"])
    keys |= set(report["merge_gain"]) | set(report["images_summary"])
    assert keys - documented == set()
    # a second run reuses the finished pass
    code, stdout, _ = run_cli("analyze", "--checkpoint", trained, "--out", out, "--gallery", "0", "--bins", "0.05",
                              "--bins", "0.2", "--device", "cpu")
    assert code == 0 and "already done" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bins", "0.5", "--bins", "0.1"], "--bins: edges must increase"),
        (["--scales", "1", "--scales", "0.75"], "--scales: this attention model runs on its trained scales"),
        (["--split", "nosuch"], "nosuch.txt: split list not found"),
        (["--bench", "missing.json"], "missing.json: bench JSON not found"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(trained: Path, tmp_path: Path, run_cli, args, message) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep"
    code, _, stderr = run_cli("analyze", "--checkpoint", trained, "--out", out, *args)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_refuses_to_write_over_files_it_did_not_make(trained: Path, tmp_path: Path, run_cli) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("my page")
    code, _, stderr = run_cli("analyze", "--checkpoint", trained, "--out", out)
    assert code == 2 and "not written by msattn analyze" in stderr
    assert (out / "index.html").read_text() == "my page"


def test_without_matplotlib_it_says_what_to_install(trained: Path, tmp_path: Path, run_cli, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, stderr = run_cli("analyze", "--checkpoint", trained, "--out", tmp_path / "rep")
    assert code == 1 and 'pip install "msattn[report]"' in stderr
    assert not (tmp_path / "rep").exists()
