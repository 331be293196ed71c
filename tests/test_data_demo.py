"""prepare-data demo: determinism, scale range, workers, resume after a killed run."""

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
from _data_helpers import run_cli, tree_bytes
from PIL import Image

from msattn.data.prepare.demo import CLASSES, HEIGHT_RANGE, prepare_demo, render_scene, scene_rng


def test_cli_demo_writes_a_dataset_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    code, stdout, stderr = run_cli(capsys, "prepare-data", "demo", "--out", out, "--num-train", "8", "--num-val", "3",
                                   "--image-size", "48", "--workers", "0")  # fmt: skip
    assert code == 0, stderr
    assert "demo" in stdout
    assert (out / "train.txt").read_text().split() == [f"train_{i:05d}" for i in range(8)]
    assert (out / "val.txt").read_text().split() == [f"val_{i:05d}" for i in range(3)]
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == list(CLASSES) == ["background", "head", "torso", "arms", "legs"]
    assert info["counts"] == {"train": 8, "val": 3}
    seen = set()
    for item_id in ["train_00000", "val_00002"]:
        image = Image.open(out / "images" / f"{item_id}.jpg")
        label = Image.open(out / "labels" / f"{item_id}.png")
        assert image.format == "JPEG" and image.size == (48, 48) and image.mode == "RGB"
        assert label.mode == "P" and label.size == (48, 48)
        seen |= set(np.unique(np.array(label)).tolist())
    assert seen <= set(range(len(CLASSES))) and 0 in seen and len(seen) > 2


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_demo(tmp_path / name, num_train=4, num_val=2, image_size=40, seed=seed, workers=0)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    a, c = (np.array(Image.open(tmp_path / n / "labels" / "train_00000.png")) for n in "ac")
    assert not np.array_equal(a, c)


def test_workers_give_the_same_output(tmp_path: Path) -> None:
    prepare_demo(tmp_path / "serial", num_train=10, num_val=4, image_size=40, seed=5, workers=0)
    prepare_demo(tmp_path / "pool", num_train=10, num_val=4, image_size=40, seed=5, workers=2)
    assert tree_bytes(tmp_path / "serial") == tree_bytes(tmp_path / "pool")


def test_figures_span_more_than_8x_and_labels_follow_the_drawing() -> None:
    size = 96
    heights, present = [], set()
    for index in range(150):
        image, label, figures = render_scene(scene_rng(0, "train", index), size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8 and label.dtype == np.uint8
        heights += [f["height"] for f in figures]
        present |= set(np.unique(label).tolist())
        assert 1 <= len(figures) <= 4
    assert HEIGHT_RANGE[1] / HEIGHT_RANGE[0] >= 8
    assert min(heights) < 0.15 * size and max(heights) > 0.85 * size
    assert max(heights) / min(heights) >= 8
    assert present == set(range(len(CLASSES)))
    # a big figure: its head is round and on top of its torso, its legs below
    image, label, figures = render_scene(scene_rng(0, "train", 1), size)
    rows = {c: np.nonzero((label == c).any(axis=1))[0] for c in (1, 2, 4) if (label == c).any()}
    if len(rows) == 3 and max(f["height"] for f in figures) > 60:
        assert rows[1].mean() < rows[2].mean() < rows[4].mean()


def test_part_colours_differ() -> None:
    """Head (skin), torso (shirt) and legs (dark trousers) carry colour cues a tiny model can learn."""
    means = {c: [] for c in range(1, 5)}
    for index in range(60):
        image, label, _ = render_scene(scene_rng(2, "val", index), 64)
        for c in means:
            if (label == c).sum() > 20:
                means[c].append(image[label == c].mean(axis=0))
    head, legs = np.mean(means[1], axis=0), np.mean(means[4], axis=0)
    assert head[0] > head[2] + 30  # skin: red over blue
    assert legs.mean() < 90  # trousers are dark
    assert legs.mean() < head.mean() - 60


def test_killed_run_resumes_to_identical_output(tmp_path: Path) -> None:
    out, fresh = tmp_path / "killed", tmp_path / "fresh"
    args = ["--num-train", "120", "--num-val", "10", "--image-size", "32", "--seed", "7", "--workers", "0"]
    cmd = [sys.executable, "-m", "msattn.cli", "prepare-data", "demo", "--out", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "labels").is_dir() and len(os.listdir(out / "labels")) >= 10:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = len([p for p in (out / "labels").iterdir() if p.suffix == ".png"])
    assert proc.returncode == -signal.SIGKILL and 0 < done < 130, "the run was not interrupted midway"
    assert not (out / "dataset.json").exists()

    summary = prepare_demo(out, num_train=120, num_val=10, image_size=32, seed=7, workers=0)
    assert summary.already_done >= done - 1 and summary.written + summary.already_done == 130
    prepare_demo(fresh, num_train=120, num_val=10, image_size=32, seed=7, workers=0)
    assert tree_bytes(out) == tree_bytes(fresh)
    assert not [p for p in out.rglob(".tmp-*")]


def test_other_settings_into_the_same_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    prepare_demo(out, num_train=2, num_val=1, image_size=32, seed=0, workers=0)
    code, _, stderr = run_cli(capsys, "prepare-data", "demo", "--out", out, "--num-train", "2", "--num-val", "1",
                              "--image-size", "32", "--seed", "1")  # fmt: skip
    assert code == 2
    assert stderr.strip() == f"msattn: error: {out}: was prepared with other settings (seed: 0 -> 1); choose another --out or delete the folder"


def test_silhouette_style_draws_each_figure_in_one_colour_and_larger() -> None:
    from msattn.data.prepare.demo import STYLES

    style, size = STYLES["silhouettes"], 96
    heights, spreads, coloured = [], [], []
    for index in range(40):
        image, label, figures = render_scene(scene_rng(0, "train", index), size, style)
        plain, _, _ = render_scene(scene_rng(0, "train", index), size)
        heights += [f["height"] for f in figures]
        # a single figure: its parts' mean colours agree in the silhouette, not in the default style
        if len(figures) == 1:
            for picture, out in ((image, spreads), (plain, coloured)):
                means = [picture[label == c].mean(axis=0) for c in (1, 2, 4) if (label == c).sum() > 30]
                if len(means) >= 2:
                    out.append(np.ptp(np.array(means), axis=0).max())
    assert max(heights) > 1.5 * size and min(heights) < 0.15 * size
    assert spreads and max(spreads) < 25  # JPEG-free render: only the per-shape jitter (sd 6) and noise
    assert coloured and np.median(coloured) > 40


def test_style_is_recorded_and_default_folders_keep_their_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sil"
    code, _, stderr = run_cli(capsys, "prepare-data", "demo", "--out", out, "--num-train", "2", "--num-val", "1",
                              "--image-size", "32", "--workers", "0", "--style", "silhouettes")  # fmt: skip
    assert code == 0, stderr
    sources = json.loads((out / "dataset.json").read_text())["sources"]
    assert sources["style"] == "silhouettes" and sources["height_range"] == [0.11, 3.0]
    assert sources["drawing"]["silhouette"] == 1.0
    plain = tmp_path / "plain"
    prepare_demo(plain, num_train=2, num_val=1, image_size=32, seed=0, workers=0)
    assert "style" not in json.loads((plain / "dataset.json").read_text())["sources"]
    assert tree_bytes(out / "labels") != tree_bytes(plain / "labels")
    code, _, stderr = run_cli(capsys, "prepare-data", "demo", "--out", plain, "--num-train", "2", "--num-val", "1",
                              "--image-size", "32", "--style", "silhouettes")  # fmt: skip
    assert code == 2 and "was prepared with other settings" in stderr
    code, _, stderr = run_cli(capsys, "prepare-data", "demo", "--out", tmp_path / "x", "--style", "cartoon")
    assert code == 2 and stderr.strip() == "msattn: error: --style must be one of figures, silhouettes, got 'cartoon'"


def test_workers_draw_the_style_they_are_given(tmp_path: Path) -> None:
    """The style travels with each task, so worker processes draw it too (not the module default)."""
    prepare_demo(tmp_path / "serial", num_train=6, num_val=2, image_size=40, seed=3, workers=0, style="silhouettes")
    prepare_demo(tmp_path / "pool", num_train=6, num_val=2, image_size=40, seed=3, workers=2, style="silhouettes")
    assert tree_bytes(tmp_path / "serial") == tree_bytes(tmp_path / "pool")


def test_the_scale_demo_recipe_prepares_silhouettes_and_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """recipes/demo-scales.toml: data.auto_prepare = "demo-silhouettes" builds that style, then trains."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "demo-scales.toml"
    root = tmp_path / "sil"
    code, _, stderr = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--set", f"data.root={root}",
                              "--set", "train.iterations=1", "--set", "train.eval_at_end=false",
                              "--set", "data.check=off")  # fmt: skip
    assert code == 0, stderr
    sources = json.loads((root / "dataset.json").read_text())["sources"]
    assert sources["style"] == "silhouettes" and sources["num_train"] == 240
    assert (tmp_path / "run" / "last.pt").is_file()
