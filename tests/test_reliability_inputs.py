"""Inputs read as people see them, answers that cannot be silently wrong, messages a user can act on.

Issue 14 (inputs/outputs): scale order, labels that cannot be right, EXIF / 16-bit / alpha /
every image format, UTF-8 BOMs, paths that look like Rich markup, extreme image shapes, the
new user's .txt lists and "which file do I open", and help that shows flags as flags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import _data_helpers
import numpy as np
import pytest
from _data_helpers import pattern_image, photo
from engine_helpers import make_tiny_dataset, save_tiny_checkpoint, write_recipe
from PIL import Image


def tiny_checkpoint(path: Path, scales=(1.0, 0.5), merge: str = "attention", root: str = "", **dataset) -> Path:
    return save_tiny_checkpoint(path, root, scales, merge, **dataset)


def with_exif_orientation(path: Path, array: np.ndarray, orientation: int) -> Path:
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)
    return path


# ----------------------------------------------------------------------------- scales


def test_scales_in_another_order_are_put_in_the_trained_order(tmp_path: Path, run_cli) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    photo(tmp_path / "in" / "a.png")
    runs = {}
    for name, scales in (("trained", ["1.0", "0.5"]), ("swapped", ["0.5", "1.0"])):
        options = [v for s in scales for v in ("--scales", s)]
        code, _, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / name,
                               "--save-probs", "--save-attention", "--device", "cpu", *options)  # fmt: skip
        assert code == 0, err
        runs[name] = np.load(tmp_path / name / "a.npz")
    assert "taken in the trained order [1.0, 0.5]" in err
    swapped, trained = runs["swapped"], runs["trained"]
    np.testing.assert_array_equal(swapped["scales"], [1.0, 0.5])  # before: [0.5, 1.0] over maps in the order [1, 0.5]
    np.testing.assert_array_equal(swapped["attention"], trained["attention"])
    np.testing.assert_array_equal(swapped["probs"], trained["probs"])


def test_scales_an_attention_head_never_saw_are_refused_max_takes_any(tmp_path: Path, run_cli) -> None:
    photo(tmp_path / "in" / "a.png")
    ckpt = tiny_checkpoint(tmp_path / "att.pt")
    code, _, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o",
                           "--scales", "1.0", "--scales", "0.75")  # fmt: skip
    assert code == 2 and "trained on 2 scales [1.0, 0.5]" in err and "[1.0, 0.75]" in err  # before: ran silently
    assert not (tmp_path / "o").exists()
    maxed = tiny_checkpoint(tmp_path / "max.pt", merge="max")
    code, _, err = run_cli("predict", tmp_path / "in", "--checkpoint", maxed, "--out", tmp_path / "m",
                           "--scales", "0.75", "--scales", "1.25", "--scales", "0.5")  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(("values", "message"), [
    (["0"], "scales must lie in (0, 4], got 0"),
    (["-1"], "got -1"),
    (["nan"], "got nan"),
    (["9"], "got 9"),
    (["1.0", "1.0"], "scale 1 is given twice"),
])  # fmt: skip
def test_bad_scale_values_are_one_line_usage_errors(tmp_path: Path, run_cli, values, message) -> None:
    photo(tmp_path / "in" / "a.png")
    ckpt = tiny_checkpoint(tmp_path / "m.pt", merge="max")
    options = [v for s in values for v in ("--scales", s)]
    code, _, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o", *options)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("msattn: error: --scales: ") and message in err


# ----------------------------------------------------------------------------- labels that cannot be right


def _dataset(root: Path, **kwargs) -> Path:
    return make_tiny_dataset(root, num_train=1, num_val=3, **kwargs)


def _evaluate(run_cli, data: Path, tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    ckpt = tiny_checkpoint(tmp_path / "m.pt", root=str(data))
    return run_cli("evaluate", "--checkpoint", ckpt, "--device", "cpu", *extra)


def test_binary_0_255_masks_warn_and_all_ignored_labels_are_an_error(tmp_path: Path, run_cli) -> None:
    data = _dataset(tmp_path / "binary")
    for i in range(3):
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[8:20, 8:20] = 255  # a foreground mask saved as 0/255: 255 means "ignore" here
        Image.fromarray(mask, mode="L").save(data / "labels" / f"val_{i:03d}.png")
    code, stdout, err = _evaluate(run_cli, data, tmp_path)
    assert code == 0, err
    assert "3 files" in err and "val_000.png" in err and "holds only the values 0 and 255" in err
    for i in range(3):
        Image.fromarray(np.full((32, 32), 255, np.uint8), mode="L").save(data / "labels" / f"val_{i:03d}.png")
    code, stdout, err = _evaluate(run_cli, data, tmp_path)
    assert code == 2 and "every label pixel of the 3 image(s) is 255" in err  # before: a score was printed
    assert "mIoU" not in stdout


def test_a_label_palette_other_than_the_datasets_warns(tmp_path: Path, run_cli) -> None:
    data = _dataset(tmp_path / "d")
    label = Image.open(data / "labels" / "val_001.png")
    label.putpalette([0, 0, 0, 0, 0, 255, 255, 0, 0] + [0] * 759)  # class 1 drawn blue: another dataset's labels?
    label.save(data / "labels" / "val_001.png")
    code, _, err = _evaluate(run_cli, data, tmp_path)
    assert code == 0, err
    assert "val_001.png: its palette colours class 1 (0, 0, 255), dataset.json says (128, 0, 0)" in err


def test_duplicate_ids_count_once_with_a_warning(tmp_path: Path, run_cli) -> None:
    data = _dataset(tmp_path / "d")
    (data / "val.txt").write_text("val_000\nval_001\nval_000\nval_002\nval_001\n")
    code, _, err = _evaluate(run_cli, data, tmp_path, "--json", str(tmp_path / "s.json"))
    assert code == 0, err
    assert "2 id(s) listed more than once, counted once: val_000, val_001" in err
    assert json.loads((tmp_path / "s.json").read_text())["num_images"] == 3


# ----------------------------------------------------------------------------- images as people see them


def test_open_image_scales_16_bit_and_composites_alpha(tmp_path: Path) -> None:
    from msattn.io import open_image

    grey16 = np.full((6, 8), 30000, dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(open_image(tmp_path / "g16.png"))
    assert rgb.shape == (6, 8, 3) and np.all(rgb == round(30000 / 257))  # before: 255 everywhere (clipped)
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:, :4, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = np.asarray(open_image(tmp_path / "a.png"))
    assert np.all(out[:, :4] == (10, 20, 30)) and np.all(out[:, 4:] == 255)  # before: the hidden (10, 20, 30)
    Image.fromarray(np.stack([np.full((6, 8), 90, np.uint8), rgba[..., 3]], -1), mode="LA").save(tmp_path / "la.png")
    out = np.asarray(open_image(tmp_path / "la.png"))
    assert np.all(out[:, :4] == 90) and np.all(out[:, 4:] == 255)


def test_predict_reads_every_pillow_format_in_folders_and_names_what_it_skips(tmp_path: Path, run_cli) -> None:
    folder = tmp_path / "in"
    for k, name in enumerate(("a.jpg", "b.PNG", "c.webp", "d.bmp", "e.tif", "f.tiff", "g.gif", "h.jpeg")):
        photo(folder / name, seed=k)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    (folder / ".DS_Store").write_bytes(b"\0")
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    code, stdout, err = run_cli("predict", folder, "--checkpoint", ckpt, "--out", tmp_path / "o", "--device", "cpu")
    assert code == 0, err
    assert "predicted 8 image(s)" in stdout  # before: 3 (jpg, png, jpeg); the others dropped without a word
    assert "1 file(s) not read" in err and "notes.txt" in err and "1 subfolder(s) not read" in err and "sub" in err
    assert ".DS_Store" not in err


def test_exif_orientation_is_applied_as_viewers_do(tmp_path: Path, run_cli) -> None:
    stored = pattern_image(20, 36)  # 36 wide, 20 high as stored; orientation 6: shown 20 wide, 36 high
    (tmp_path / "in").mkdir()
    with_exif_orientation(tmp_path / "in" / "p.jpg", stored, 6)
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    code, _, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o", "--device", "cpu")
    assert code == 0, err
    assert Image.open(tmp_path / "o" / "p.png").size == (20, 36)  # before: (36, 20), the photo on its side


def test_dataset_images_turn_by_exif_only_when_their_label_was_drawn_turned(tmp_path: Path) -> None:
    from msattn.data.datasets import SegmentationFolder

    data = _dataset(tmp_path / "d", size=32)
    stored = pattern_image(20, 36)
    with_exif_orientation(data / "images" / "val_000.jpg", stored, 6)  # label drawn on the turned image: 20x36
    Image.fromarray(np.zeros((36, 20), np.uint8), mode="L").save(data / "labels" / "val_000.png")
    with_exif_orientation(data / "images" / "val_001.jpg", stored, 6)  # label drawn on the stored pixels: 36x20
    Image.fromarray(np.zeros((20, 36), np.uint8), mode="L").save(data / "labels" / "val_001.png")
    dataset = SegmentationFolder(data, "val")
    turned, stays = dataset[0], dataset[1]  # before: val_000 failed ("label is 20x36, image is 36x20")
    assert tuple(turned["image"].shape[-2:]) == (36, 20) and not turned["warnings"]
    assert tuple(stays["image"].shape[-2:]) == (20, 36)
    assert [m for _, m in stays["warnings"]] and "EXIF orientation 6" in stays["warnings"][0][1]


# ----------------------------------------------------------------------------- errors a user can act on


def test_a_utf8_bom_is_accepted_in_lists_recipes_and_dataset_json(tmp_path: Path, run_cli) -> None:
    bom = "\ufeff"
    data = _dataset(tmp_path / "d")
    (data / "val.txt").write_text(bom + "val_000\nval_001\n", encoding="utf-8")
    info = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(bom + json.dumps(info), encoding="utf-8")
    code, _, err = _evaluate(run_cli, data, tmp_path, "--json", str(tmp_path / "s.json"))
    assert code == 0, err  # before: "invalid id" / "not valid JSON (Unexpected UTF-8 BOM)"
    assert json.loads((tmp_path / "s.json").read_text())["num_images"] == 2
    recipe = write_recipe(tmp_path / "r.toml", data)
    recipe.write_text(bom + recipe.read_text(), encoding="utf-8")
    code, _, err = run_cli("train", recipe, "--dry-run", "--out", tmp_path / "run")
    assert code == 0, err
    crf_recipe = tmp_path / "crf.toml"
    crf_recipe.write_text(bom + "[crf]\nbi_w = 5.0\n", encoding="utf-8")
    from msattn.crf import load_crf_params

    assert load_crf_params(crf_recipe).bi_w == 5.0


@pytest.mark.parametrize(("meta", "message"), [
    ({"classes": "background"}, "dataset.classes must be a list of class names"),
    ({"palette": [[0, 0], [1, 2]]}, "dataset.palette must be a list of [r, g, b] colours"),
    ({"std": [0.2, 0.0, 0.2]}, "dataset.std must be 3 numbers"),
])  # fmt: skip
def test_malformed_checkpoint_metadata_is_named(tmp_path: Path, run_cli, meta, message) -> None:
    photo(tmp_path / "in" / "a.png")
    ckpt = tiny_checkpoint(tmp_path / "m.pt", **meta)
    code, _, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o")
    assert code == 2 and "Traceback" not in err, err
    assert f"m.pt: malformed checkpoint: {message}" in err


def test_paths_that_look_like_rich_markup_print_verbatim(tmp_path: Path, run_cli) -> None:
    images = tmp_path / "p[/x]"
    photo(images / "[bold]a.png")
    (images / "[red]n.txt").write_text("x")
    ckpt = tiny_checkpoint(tmp_path / "run[lr=0.01].pt")
    out = tmp_path / "o[/b]"
    code, stdout, err = run_cli("predict", images, "--checkpoint", ckpt, "--out", out, "--save-probs", "--device", "cpu")
    assert code == 0, err  # before: rich.errors.MarkupError on "[/b]"
    assert f"-> {out}" in stdout and "[red]n.txt" in err
    refined = tmp_path / "r[/i]"
    code, stdout, err = run_cli("crf-refine", "--images", images, "--probs", out, "--out", refined, "--workers", "0")
    assert code == 0 and f"-> {refined}" in stdout, err
    data = make_tiny_dataset(tmp_path / "d[/u]", num_train=1, num_val=1)
    info = json.loads((data / "dataset.json").read_text())
    info["classes"] = ["background", "[red]", "[/green]"]
    (data / "dataset.json").write_text(json.dumps(info))
    ckpt = tiny_checkpoint(tmp_path / "e[/s].pt", root=str(data), classes=info["classes"])
    code, stdout, err = run_cli("evaluate", "--checkpoint", ckpt, "--device", "cpu", "--json", tmp_path / "j[/x].json")
    assert code == 0, err
    assert "[red]" in stdout and "[/green]" in stdout and str(ckpt) in stdout.replace("\n", "")


def test_an_extreme_strip_stays_within_bounds(tmp_path: Path) -> None:
    from msattn.engine.visualize import attention_figure, attention_heatmap

    image = pattern_image(8, 6000)
    weights = np.random.default_rng(0).random((2, 8, 6000))
    figure = attention_figure(image, np.zeros((8, 6000), np.uint8), weights, (1.0, 0.5), classes=["a"])
    assert figure.width * figure.height < 4_000_000  # before: 4 panels of 144000x192 pixels
    heat = attention_heatmap(image, weights[0])
    assert heat.height < 200 and heat.width < 6300  # native width kept, not enlarged 24x
    tall = attention_heatmap(pattern_image(6000, 8), weights[0].T)
    assert tall.width < 300  # no 375-pixel title font on an 8-pixel-wide strip


# ----------------------------------------------------------------------------- what a new user tripped over


def test_a_datasets_own_val_txt_of_bare_ids_works_and_the_hint_names_a_file(tmp_path: Path, run_cli) -> None:
    data = _dataset(tmp_path / "d")
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "o"
    code, stdout, err = run_cli("predict", data / "val.txt", "--checkpoint", ckpt, "--out", out, "--save-attention",
                                "--device", "cpu")  # fmt: skip
    assert code == 0, err  # before: "d/val_000: file not found" for every id
    assert "predicted 3 image(s)" in stdout
    hint = stdout.strip().splitlines()[-1]
    assert hint == f"open {out / 'val_000_attention.png'}" and (out / "val_000_attention.png").is_file()
    ids = tmp_path / "ids.txt"
    ids.write_text("val_002\ntrain_000.jpg\n")
    code, stdout, err = run_cli("predict", ids, "--images-dir", data / "images", "--checkpoint", ckpt,
                                "--out", tmp_path / "o2", "--no-overlay", "--device", "cpu")  # fmt: skip
    assert code == 0 and "predicted 2 image(s)" in stdout, err
    assert stdout.strip().splitlines()[-1] == f"open {tmp_path / 'o2' / 'val_002.png'}"


def test_help_shows_flags_as_flags_and_arguments_by_name(run_cli) -> None:
    for args in ((), ("train",), ("predict",), ("prepare-data", "demo"), ("evaluate",)):
        code, stdout, err = run_cli(*args, "--help")
        assert code == 0, err
        assert "<bool>" not in stdout and "{" not in stdout.split("Usage:")[1].splitlines()[0], stdout
    _, stdout, _ = run_cli("train", "--help")
    assert "msattn train [OPTIONS] RECIPE" in stdout and "--resume" in stdout
    _, stdout, _ = run_cli("predict", "--help")
    assert "INPUTS..." in stdout


def test_missing_fixtures_skip_with_how_to_get_them_and_fail_when_required(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(_data_helpers.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        _data_helpers.fixtures_dir(tmp_path / "nowhere")
    assert "tests/fixtures" in str(skipped.value) and "MSATTN_FIXTURES=" in str(skipped.value)
    monkeypatch.setenv(_data_helpers.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="MSATTN_REQUIRE_FIXTURES=1"):
        _data_helpers.fixtures_dir(tmp_path / "nowhere")
    assert os.environ[_data_helpers.REQUIRE_ENV] == "1"


def test_prepare_data_accepts_a_label_drawn_on_the_turned_photo(tmp_path: Path, run_cli) -> None:
    from msattn.data.datasets import SegmentationFolder

    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    with_exif_orientation(voc / "JPEGImages" / "2007_000129.jpg", pattern_image(20, 36), 6)  # shown 20 wide, 36 high
    label = np.zeros((36, 20), dtype=np.uint8)  # drawn on the photo as shown
    label[4:30, 5:15] = 15
    Image.fromarray(label, mode="L").save(voc / "SegmentationClass" / "2007_000129.png")
    code, _, err = run_cli("prepare-data", "voc", "--voc", voc, "--out", tmp_path / "out", "-j", "0")
    assert code == 0, err  # before: "image is 36x20 but its annotation is 20x36"
    split = "train" if "2007_000129" in (tmp_path / "out" / "train.txt").read_text() else "val"
    item = SegmentationFolder(tmp_path / "out", split)[0]
    assert tuple(item["image"].shape[-2:]) == (36, 20) and int((item["label"] == 15).sum()) == 26 * 10


def test_an_input_named_twice_is_predicted_once_with_a_note(tmp_path: Path, run_cli) -> None:
    photo(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "list.txt").write_text("a.png\na\n./a.png\n")
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    code, stdout, err = run_cli("predict", tmp_path / "in" / "list.txt", tmp_path / "in" / "a.png", "--checkpoint",
                                ckpt, "--out", tmp_path / "o", "--device", "cpu")  # fmt: skip
    assert code == 0 and "predicted 1 image(s)" in stdout, err
    assert "1 input(s) named more than once, predicted once" in err  # before: dropped without a word


def test_a_70000_pixel_wide_strip_gets_all_its_files(tmp_path: Path, run_cli) -> None:
    Image.fromarray(pattern_image(4, 70000)).save(photo(tmp_path / "in" / "a.png").parent / "wide.png")
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    code, stdout, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o",
                                "--device", "cpu")  # fmt: skip
    assert code == 0 and "predicted 2 image(s), skipped 0" in stdout, err  # before: "broken data stream", exit 1
    assert Image.open(tmp_path / "o" / "wide.png").size == (70000, 4)
    width, height = Image.open(tmp_path / "o" / "wide_overlay.jpg").size
    assert 1000 < width <= 65500 and height >= 1  # downscaled: JPEG's limit is 65,535 (and huge previews are reduced)


def test_an_image_whose_files_cannot_be_written_costs_only_itself(tmp_path: Path, run_cli, monkeypatch) -> None:
    from msattn.engine import visualize

    real = visualize.attention_figure

    def figure(image, *args, **kwargs):
        if image.shape[0] == 30:
            raise ValueError("cannot draw this one")
        return real(image, *args, **kwargs)

    monkeypatch.setattr(visualize, "attention_figure", figure)
    photo(tmp_path / "in" / "a.png", height=24)
    photo(tmp_path / "in" / "b.png", height=30)
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    code, stdout, err = run_cli("predict", tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o",
                                "--save-attention", "--device", "cpu")  # fmt: skip
    assert code == 0, err  # before: a traceback, and b.png, b_overlay.jpg, b_attention_*.png left behind
    assert "predicted 1 image(s), skipped 1" in stdout and "b: its outputs could not be written" in err
    assert not list((tmp_path / "o").glob("b*")) and (tmp_path / "o" / "a_attention.png").is_file()
