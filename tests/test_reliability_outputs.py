"""Outputs never overwrite inputs or a user's files, one writer per folder, and outputs carry what made them.

Issue 14 (inputs/outputs): predict, crf-refine, prepare-data, evaluate --json and bench --json
refuse an output that would replace an input or a file they did not write; a second command
writing the same folder stops at once (two real processes); crf-refine and predict --resume
keep an output only when its mark (settings + input) matches, and say what changed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import pattern_image, photo, write_jpeg
from engine_helpers import make_tiny_dataset, save_tiny_checkpoint
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def tiny_checkpoint(path: Path, scales=(1.0, 0.5), merge: str = "attention", root: str = "", **dataset) -> Path:
    return save_tiny_checkpoint(path, root, scales, merge, **dataset)


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------- outputs never overwrite inputs


def test_predict_refuses_an_out_folder_that_holds_its_inputs(tmp_path: Path, run_cli) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    photos = tmp_path / "photos"
    photo(photos / "a.png")  # predict would write photos/a.png, the label map, over the photo
    photo(photos / "b.jpg", seed=1)
    before = listing(photos)
    for args in ((photos,), (photos / "a.png",), (photos / "b.jpg",)):
        code, _, err = run_cli("predict", *args, "--checkpoint", ckpt, "--out", photos, "--device", "cpu")
        assert code == 2, err
        assert "is the folder of the input images" in err and "Traceback" not in err
        assert listing(photos) == before  # not one byte changed, nothing added


def test_predict_never_writes_over_a_file_it_did_not_make(tmp_path: Path, run_cli) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    photo(tmp_path / "in" / "x.jpg")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").write_bytes(b"the user's own x.png")
    code, _, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", out, "--device", "cpu")
    assert code == 2 and "x.png" in err and "did not make" in err
    assert listing(out) == {"x.png": b"the user's own x.png"}  # refused before any work: nothing else either
    (out / "x.png").unlink()
    code, _, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", out, "--device", "cpu")
    assert code == 0, err
    code, _, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", out, "--device", "cpu")
    assert code == 0, err  # its own earlier outputs are rewritten freely


def _predicted(tmp_path: Path, run_cli) -> tuple[Path, Path]:
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    photo(tmp_path / "images" / "a.png")
    pred = tmp_path / "pred"
    code, _, err = run_cli("predict", tmp_path / "images", "--checkpoint", ckpt, "--out", pred, "--save-probs",
                           "--device", "cpu")  # fmt: skip
    assert code == 0, err
    return tmp_path / "images", pred


def test_crf_refine_never_writes_into_its_inputs_or_over_predicts_files(tmp_path: Path, run_cli) -> None:
    images, pred = _predicted(tmp_path, run_cli)
    before, photos = listing(pred), listing(images)
    code, _, err = run_cli("crf-refine", "--images", images, "--probs", pred, "--out", pred, "--workers", "0")
    assert code == 2 and "--probs" in err and "Traceback" not in err  # before: "already done 1", nothing refined
    code, _, err = run_cli("crf-refine", "--images", images, "--probs", pred, "--out", images, "--workers", "0")
    assert code == 2 and "--images" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.png").write_bytes((pred / "a.png").read_bytes())  # predict's label map, copied by the user
    code, _, err = run_cli("crf-refine", "--images", images, "--probs", pred, "--out", other, "--workers", "0")
    assert code == 2 and "a.png" in err and "did not make" in err
    assert listing(pred) == before and listing(images) == photos


def _voc_source(root: Path) -> Path:
    voc = root / "VOC2012"
    write_jpeg(voc / "JPEGImages" / "2007_000129.jpg", pattern_image(16, 20))
    label = np.zeros((16, 20), dtype=np.uint8)
    label[4:8, 4:8] = 15
    (voc / "SegmentationClass").mkdir(parents=True)
    Image.fromarray(label, mode="L").save(voc / "SegmentationClass" / "2007_000129.png")
    return voc


def test_prepare_data_never_writes_into_its_source_or_over_a_users_dataset(tmp_path: Path, run_cli) -> None:
    voc = _voc_source(tmp_path / "src")
    before = {p: p.read_bytes() for p in voc.rglob("*") if p.is_file()}
    code, _, err = run_cli("prepare-data", "voc", "--voc", voc, "--out", voc, "-j", "0")
    assert code == 2 and "is the --voc folder" in err
    inside = tmp_path / "data"
    (inside / "images").mkdir(parents=True)
    nested = _voc_source(inside / "images")  # the source where prepare-data writes out/images
    code, _, err = run_cli("prepare-data", "voc", "--voc", nested, "--out", inside, "-j", "0")
    assert code == 2 and "would write" in err
    assert {p: p.read_bytes() for p in voc.rglob("*") if p.is_file()} == before
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "train_00000.jpg").write_bytes(b"my photo")
    code, _, err = run_cli("prepare-data", "demo", "--out", mine, "--num-train", "2", "--num-val", "1", "-j", "0")
    assert code == 2 and "not written by prepare-data" in err
    assert (mine / "images" / "train_00000.jpg").read_bytes() == b"my photo"
    code, _, err = run_cli("prepare-data", "voc", "--voc", voc, "--out", voc / "prepared", "-j", "0")
    assert code == 0, err  # inside the source folder is fine: every name written there is new


def test_json_outputs_are_checked_before_the_work_starts(tmp_path: Path, run_cli, monkeypatch) -> None:
    import msattn.bench.run as bench
    import msattn.infer.evaluate as evaluate

    data = make_tiny_dataset(tmp_path / "data", num_train=1, num_val=2)
    ckpt = tiny_checkpoint(tmp_path / "m.pt", root=str(data))

    def never(*args, **kwargs):
        raise AssertionError("the work started before --json was checked")

    monkeypatch.setattr(evaluate, "evaluate_model", never)
    monkeypatch.setattr(bench, "bench_model", never)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    cases = {
        tmp_path: "is a folder",
        ckpt: "is an input",
        data / "dataset.json": "not written by msattn",
        blocker: "not written by msattn",
        blocker / "scores.json": "is a file, not a folder",
    }
    snapshot = {p: p.read_bytes() for p in (ckpt, data / "dataset.json", blocker)}
    for target, message in cases.items():
        code, _, err = run_cli("evaluate", "--checkpoint", ckpt, "--device", "cpu", "--json", target)
        assert code == 2 and message in err and "Traceback" not in err, (target, err)
    code, _, err = run_cli("bench", "--json", tmp_path, "--size", "33", "--width", "0.0625")
    assert code == 2 and "--json" in err and "is a folder" in err
    assert {p: p.read_bytes() for p in snapshot} == snapshot


# ----------------------------------------------------------------------------- one writer per folder: two processes

#: msattn's CLI with os.fsync patched: the first fsync (the first file written) touches MARKER and waits.
PAUSED_CLI = """
import os, sys, time
marker = sys.argv[1]
real_fsync = os.fsync
def fsync(fd):
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(120)
    real_fsync(fd)
os.fsync = fsync
from msattn.cli.app import main
main(sys.argv[2:])
"""


def _commands(tmp_path: Path, run_cli) -> dict[str, list[str]]:
    images, pred = _predicted(tmp_path, run_cli)
    busy = str(tmp_path / "busy")
    return {
        "predict": ["predict", str(images), "--checkpoint", str(tmp_path / "m.pt"), "--out", busy, "--device", "cpu"],
        "crf-refine": ["crf-refine", "--images", str(images), "--probs", str(pred), "--out", busy, "--workers", "0"],
        "prepare-data": ["prepare-data", "demo", "--out", busy, "--num-train", "2", "--num-val", "1", "-j", "0"],
    }


@pytest.mark.parametrize("command", ["predict", "crf-refine", "prepare-data"])
def test_a_second_writer_of_the_same_folder_exits_2_naming_the_other(tmp_path: Path, run_cli, command: str) -> None:
    argv = _commands(tmp_path, run_cli)[command]
    marker = tmp_path / "first-is-writing"
    env = {**os.environ, "COLUMNS": "200"}
    first = subprocess.Popen([sys.executable, "-c", PAUSED_CLI, str(marker), *argv], cwd=ROOT, env=env,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first command never started writing"
            time.sleep(0.02)
        second = subprocess.run([sys.executable, "-m", "msattn.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
        first.stderr.close()
    assert second.returncode == 2, second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"msattn: error: {tmp_path / 'busy'}: another command is writing this folder"), last
    assert f"process {first.pid}" in last and f"msattn {command}" in last
    assert "Traceback" not in second.stderr


# ----------------------------------------------------------------------------- outputs carry what made them


def test_crf_refine_redoes_outputs_made_with_other_settings_or_inputs(tmp_path: Path, run_cli) -> None:
    images, pred = _predicted(tmp_path, run_cli)
    out = tmp_path / "refined"
    args = ("crf-refine", "--images", images, "--probs", pred, "--out", out, "--workers", "0")
    code, stdout, err = run_cli(*args)
    assert code == 0 and "refined 1, already done 0" in stdout, err
    code, stdout, err = run_cli(*args)
    assert code == 0 and "refined 0, already done 1" in stdout, err  # same settings, same inputs: kept
    code, stdout, err = run_cli(*args, "--bi-w", "9")
    assert code == 0 and "refined 1, already done 0" in stdout, err  # before: kept the maps made with bi_w 4
    assert "made with other settings" in err and "bi_w" in err and "4.0" in err and "9.0" in err
    time.sleep(0.01)
    os.utime(pred / "a.npz")  # predict wrote new probabilities
    code, stdout, err = run_cli(*args, "--bi-w", "9")
    assert code == 0 and "refined 1" in stdout and "another version of their input" in err
    record = json.loads((out / ".msattn-crf-refine.json").read_text())
    assert {s["crf"]["bi_w"] for s in record["settings"].values()} == {4.0, 9.0}


def test_predict_resume_keeps_only_outputs_of_the_same_settings_and_inputs(tmp_path: Path, run_cli) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    photo(tmp_path / "in" / "a.png")
    photo(tmp_path / "in" / "b.png", seed=1)
    out = tmp_path / "o"
    args = ("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", out, "--device", "cpu", "--resume")
    code, stdout, err = run_cli(*args)
    assert code == 0 and "predicted 2 image(s)" in stdout, err
    code, stdout, err = run_cli(*args)
    assert code == 0 and "predicted 0 image(s), skipped 0, 2 already done" in stdout, err
    code, stdout, err = run_cli(*args, "--pad-to", "65")
    assert code == 0 and "predicted 2 image(s)" in stdout, err  # before: "2 already done" with the old padding
    assert "made with other settings (pad_to: null -> 65)" in err
    photo(tmp_path / "in" / "b.png", seed=7)  # the user replaced a photo
    code, stdout, err = run_cli(*args, "--pad-to", "65")
    assert code == 0 and "predicted 1 image(s), skipped 0, 1 already done" in stdout, err
    tiny_checkpoint(tmp_path / "m.pt", scales=(1.0, 0.75))  # retrained into the same file
    code, stdout, err = run_cli(*args, "--pad-to", "65")
    assert code == 0 and "predicted 2 image(s)" in stdout and "model_sha256" in err, err
