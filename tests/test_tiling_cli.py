"""Tiling through the real CLI: predict/evaluate --tile, --max-memory, recipe keys, --resume, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import make_tiny_dataset, write_recipe
from PIL import Image
from tiling_helpers import local_model, scene

from msattn.models.scale import build_model
from msattn.runtime.checkpoint import make_checkpoint, save_checkpoint

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
DATASET = {"name": "toy", "classes": ["background", "red", "green"], "palette": [[0, 0, 0], [200, 0, 0], [0, 200, 0]],
           "ignore_index": 255, "root": "", "mean": list(MEAN), "std": list(STD)}  # fmt: skip


def local_checkpoint(path: Path, scales=(1.0, 0.75, 0.5), merge: str = "attention") -> Path:
    save_checkpoint(path, make_checkpoint(local_model(scales, merge), DATASET))
    return path


def scene_file(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """The scene as an RGB file whose normalisation (MEAN, STD) gives the model's colours back."""
    image, _ = scene(height, width, seed=seed)
    rgb = ((image[0].permute(1, 2, 0) * torch.tensor(STD) + torch.tensor(MEAN)) * 255).round().clamp(0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.byte().numpy()).save(path)
    return path


def labels_of(folder: Path, name: str) -> np.ndarray:
    return np.array(Image.open(folder / f"{name}.png"))


def test_predict_tile_matches_whole_and_writes_every_file(tmp_path: Path, run_cli) -> None:
    ckpt = local_checkpoint(tmp_path / "m.pt")
    image = scene_file(tmp_path / "in" / "scene.png", 289, 417)
    small = scene_file(tmp_path / "in" / "small.png", 60, 70, seed=1)  # fits a tile: predicted whole
    whole, tiled = tmp_path / "whole", tmp_path / "tiled"
    code, _, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", whole, "--save-probs",
                           "--save-attention", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", tiled, "--save-probs",
                             "--save-attention", "--tile", "193", "--overlap", "64", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert "(1 in tiles)" in out
    assert sorted(p.name for p in whole.iterdir()) == sorted(p.name for p in tiled.iterdir())
    agree = (labels_of(whole, "scene") == labels_of(tiled, "scene")).mean()
    assert agree >= 0.995
    np.testing.assert_array_equal(labels_of(whole, "small"), labels_of(tiled, "small"))
    npz = np.load(tiled / "scene.npz")
    assert npz["probs"].shape == (3, 289, 417) and npz["attention"].shape == (3, 289, 417)
    np.testing.assert_allclose(npz["attention"].astype(np.float32).sum(0), 1.0, atol=5e-3)  # stitched weights
    whole_att = np.load(whole / "scene.npz")["attention"].astype(np.float32)
    assert np.abs(npz["attention"].astype(np.float32) - whole_att).mean() < 0.02
    assert image.exists() and small.exists() and not list(tiled.glob(".tmp-*"))


def test_resume_skips_images_predicted_in_tiles(tmp_path: Path, run_cli) -> None:
    ckpt = local_checkpoint(tmp_path / "m.pt", scales=(1.0, 0.5))
    scene_file(tmp_path / "in" / "a.png", 200, 150)
    scene_file(tmp_path / "in" / "b.png", 150, 210, seed=2)
    args = ("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o", "--tile", "129", "--device", "cpu")
    code, out, err = run_cli(*args)
    assert code == 0 and "predicted 2 image(s) (2 in tiles)" in out, err
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()}
    (tmp_path / "o" / "b_overlay.jpg").unlink()
    code, out, err = run_cli(*args, "--resume")
    assert code == 0 and "predicted 1 image(s) (1 in tiles), skipped 0, 1 already done" in out, err
    assert (tmp_path / "o" / "a.png").stat().st_mtime_ns == stamps["a.png"]
    assert (tmp_path / "o" / "b_overlay.jpg").is_file()


def test_max_memory_tiles_images_that_would_not_fit(tmp_path: Path, run_cli) -> None:
    ckpt = local_checkpoint(tmp_path / "m.pt", scales=(1.0, 0.5))
    scene_file(tmp_path / "in" / "a.png", 300, 400)
    code, out, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "auto",
                             "--max-memory", "12MB", "--device", "cpu")  # fmt: skip
    assert code == 0 and "(1 in tiles)" in out, err
    code, out, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "whole",
                             "--max-memory", "4GB", "--device", "cpu")  # fmt: skip
    assert code == 0 and "in tiles" not in out, err
    agree = (labels_of(tmp_path / "auto", "a") == labels_of(tmp_path / "whole", "a")).mean()
    assert agree >= 0.99


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tile", "100"), "--tile: the tile side must be 8k+1 pixels"),
        (("--tile", "129", "--overlap", "500"), "--overlap: 500 pixels leave no room"),
        (("--max-memory", "lots"), "--max-memory: expected a size such as 4GB"),
        (("--max-memory", "1kB"), "less than 1 MiB"),
    ],
)
def test_bad_tiling_options_are_one_line_errors(tmp_path: Path, run_cli, args, message) -> None:
    ckpt = local_checkpoint(tmp_path / "m.pt", scales=(1.0,), merge="avg")
    scene_file(tmp_path / "in" / "a.png", 40, 40)
    code, out, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o", *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def _spy_tiles(monkeypatch) -> list[int]:
    import msattn.infer.scoring as scoring

    calls: list[int] = []
    real = scoring.predict_tiled

    def spy(*args, **kwargs):
        calls.append(kwargs["tiling"].tile)
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "predict_tiled", spy)
    return calls


def test_evaluate_tile_flag_and_recipe_keys(tmp_path: Path, run_cli, monkeypatch) -> None:
    from msattn.config.recipe import load_recipe
    from msattn.train.loop import train

    data = make_tiny_dataset(tmp_path / "tiny", num_train=2, num_val=2, size=100)
    recipe = write_recipe(tmp_path / "r.toml", data, train={"iterations": 1},
                          eval={"batch_size": 1, "tile": 65, "overlap": 16})  # fmt: skip
    checkpoint = train(load_recipe(recipe), tmp_path / "run", device="cpu")
    calls = _spy_tiles(monkeypatch)
    code, _, err = run_cli("evaluate", "--checkpoint", checkpoint, "--json", tmp_path / "e.json", "--device", "cpu")
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["tile"] == 65 and report["overlap"] == 16 and calls == [65, 65]  # from the recipe's [eval]
    calls.clear()
    code, _, err = run_cli("evaluate", "--checkpoint", checkpoint, "--tile", "129", "--json", tmp_path / "f.json",
                           "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "f.json").read_text())["tile"] == 129 and calls == []  # 100 px images fit a tile


# VmHWM, the peak RSS of this process's own memory: getrusage's ru_maxrss would also count the
# parent's (pytest's) memory at fork time, which the kernel carries over across exec
_RSS_RUNNER = textwrap.dedent(
    """
    import sys
    from msattn.cli.app import main
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code or 0
    else:
        code = 0
    peak = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    print("PEAK_RSS_MB", peak / 1024, flush=True)
    sys.exit(code)
    """
)
RSS_BUDGET_MB = 1600  # measured about 950 MB in tiles of 1025 (2.5 GB whole) on CPU with torch 2.13


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from Linux's /proc")
def test_a_6000x4000_image_in_tiles_stays_under_a_memory_budget(tmp_path: Path) -> None:
    """Peak RSS of predict (reading, tiles, stitching, writing, attention pictures) in a subprocess."""
    torch.manual_seed(0)
    model = build_model(5, scales=(1.0, 0.5), merge="attention", width=0.0625).eval()
    dataset = {**DATASET, "classes": ["c0", "c1", "c2", "c3", "c4"], "palette": None}
    save_checkpoint(tmp_path / "m.pt", make_checkpoint(model, dataset))
    h, w = 4000, 6000
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    rgb = np.stack(np.broadcast_arrays(y, x, (y + x) / 2), axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=90)
    del rgb
    command = [sys.executable, "-c", _RSS_RUNNER, "predict", str(tmp_path / "big.jpg"), "--checkpoint",
               str(tmp_path / "m.pt"), "--out", str(tmp_path / "o"), "--tile", "1025", "--overlap", "128",
               "--save-attention", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    peak = float(done.stdout.split("PEAK_RSS_MB")[1].split()[0])
    assert peak < RSS_BUDGET_MB, f"peak RSS {peak:.0f} MB over the budget of {RSS_BUDGET_MB} MB"
    assert Image.open(tmp_path / "o" / "big.png").size == (w, h)
    assert max(Image.open(tmp_path / "o" / "big_attention_1.0.png").size) < 2400  # heat maps are downscaled
