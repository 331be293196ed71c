"""msattn predict: files written, value ranges, attention maps, bad inputs; predict_probs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msattn.data.transforms import normalize_image
from msattn.infer.forward import predict_probs
from msattn.infer.inputs import collect_inputs, unique_names
from msattn.models.scale import build_model
from msattn.runtime.checkpoint import make_checkpoint, save_checkpoint

SCALES = (1.0, 0.75, 0.5)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not ImageNet's: predict must use the checkpoint's
NUM_CLASSES = 5
PALETTE = [[0, 0, 0], [250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0]]


def tiny_checkpoint(path: Path, scales=SCALES, merge: str = "attention", config: dict | None = None):
    torch.manual_seed(0)
    model = build_model(NUM_CLASSES, scales=scales, merge=merge, width=0.0625).eval()
    dataset = {
        "name": "toy",
        "classes": ["background", "a", "b", "c", "d"],
        "palette": PALETTE,
        "ignore_index": 255,
        "root": "",
        "mean": list(MEAN),
        "std": list(STD),
    }
    save_checkpoint(path, make_checkpoint(model, dataset, config=config or {}))
    return model


def small_images(folder: Path, sizes=((40, 48), (40, 48), (32, 36))) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_real_jpeg_writes_every_file(tmp_path, run_cli, fixtures_dir) -> None:
    jpeg = fixtures_dir / "voc2012" / "JPEGImages" / "2007_000129.jpg"
    model = tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "pred"
    code, _, err = run_cli(
        "predict", jpeg, "--checkpoint", tmp_path / "m.pt", "--out", out, "--save-probs", "--save-attention",
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    image = np.array(Image.open(jpeg).convert("RGB"))
    h, w = image.shape[:2]
    name = jpeg.stem

    npz = np.load(out / f"{name}.npz")
    probs, attention = npz["probs"], npz["attention"]
    assert probs.dtype == np.float16 and probs.shape == (NUM_CLASSES, h, w)
    assert probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
    assert attention.dtype == np.float16 and attention.shape == (3, h, w)
    assert attention.min() >= 0 and attention.max() <= 1
    np.testing.assert_allclose(attention.astype(np.float32).sum(0), 1.0, atol=5e-3)  # softmax over scales
    np.testing.assert_allclose(npz["scales"], SCALES)
    assert list(npz["classes"]) == ["background", "a", "b", "c", "d"]
    np.testing.assert_array_equal(npz["palette"], PALETTE)

    # same numbers as the model called directly on the image normalised with the checkpoint's mean/std
    direct, direct_att = predict_probs(model, normalize_image(image, MEAN, STD)[None])
    np.testing.assert_allclose(probs.astype(np.float32), direct.numpy(), atol=2e-3)
    np.testing.assert_allclose(attention.astype(np.float32), direct_att.numpy(), atol=2e-3)

    labels = Image.open(out / f"{name}.png")
    assert labels.mode == "P" and labels.size == (w, h)
    label_arr = np.asarray(labels)
    assert label_arr.max() < NUM_CLASSES
    assert (label_arr == direct.numpy().argmax(0)).mean() > 0.99
    assert labels.getpalette()[3:6] == PALETTE[1]

    over = Image.open(out / f"{name}_overlay.jpg")
    assert over.mode == "RGB" and over.size == (w, h)
    expected = 0.5 * image + 0.5 * np.asarray(PALETTE)[label_arr]
    assert np.abs(np.asarray(over).astype(float) - expected).mean() < 6  # JPEG noise only

    for scale in ("1.0", "0.75", "0.5"):
        heat = Image.open(out / f"{name}_attention_{scale}.png")
        assert heat.mode == "RGB" and heat.width > w and heat.height > h  # native-size map + title + legend
    figure = Image.open(out / f"{name}_attention.png")
    assert figure.width > 4 * figure.height / 2  # image, prediction and 3 scale panels side by side
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_max_merge_saves_one_hot_winner_maps(tmp_path, run_cli) -> None:
    tiny_checkpoint(tmp_path / "m.pt", merge="max")
    paths = small_images(tmp_path / "in", sizes=((40, 48),))
    blocks = np.zeros((64, 64, 3), dtype=np.uint8)  # structure, so that different scales win
    blocks[:, 32:] = 230
    blocks[20:40, 10:20] = 60
    Image.fromarray(blocks).save(tmp_path / "in" / "blocks.png")
    paths.append(tmp_path / "in" / "blocks.png")
    code, _, err = run_cli(
        "predict", tmp_path / "in", "--checkpoint", tmp_path / "m.pt", "--out", tmp_path / "o",
        "--save-probs", "--save-attention",
    )  # fmt: skip
    assert code == 0, err
    for path in paths:
        att = np.load(tmp_path / "o" / f"{path.stem}.npz")["attention"]
        assert set(np.unique(att).tolist()) <= {0.0, 1.0}
        np.testing.assert_array_equal(att.sum(0), 1.0)  # exactly one winner per pixel
        assert (tmp_path / "o" / f"{path.stem}_attention.png").is_file()
    assert (att.sum(axis=(1, 2)) > 0).sum() >= 2  # (blocks.png) the winner changes across the image


def test_corrupt_images_are_skipped_and_others_written(tmp_path, run_cli) -> None:
    tiny_checkpoint(tmp_path / "m.pt")
    folder = tmp_path / "in"
    good = small_images(folder, sizes=((40, 48), (36, 40)))
    buf = folder / "full.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, quality=95)
    (folder / "truncated.jpg").write_bytes(buf.read_bytes()[: len(buf.read_bytes()) // 2])
    buf.unlink()
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "o"
    code, stdout, err = run_cli("predict", folder, "--checkpoint", tmp_path / "m.pt", "--out", out)
    assert code == 0, err
    assert "truncated.jpg" in err and "empty.jpg" in err and "skipped" in err
    assert "predicted 2 image(s), skipped 2" in stdout
    for path in good:
        assert (out / f"{path.stem}.png").is_file() and (out / f"{path.stem}_overlay.jpg").is_file()
    assert not (out / "truncated.png").exists() and not (out / "empty.png").exists()

    code, _, err = run_cli("predict", folder / "empty.jpg", "--checkpoint", tmp_path / "m.pt", "--out", out)
    assert code == 2 and "msattn: error:" in err and "Traceback" not in err


def test_inputs_lists_name_collisions_and_batches(tmp_path, run_cli) -> None:
    tiny_checkpoint(tmp_path / "m.pt")
    a = small_images(tmp_path / "a", sizes=((40, 48), (40, 48), (32, 36)))
    b = small_images(tmp_path / "b", sizes=((24, 30),))  # b/img0.png collides with a/img0.png
    lst = tmp_path / "lists" / "l.txt"
    lst.parent.mkdir()
    lst.write_text("# images\n../b/img0.png\n\n")
    assert collect_inputs([tmp_path / "a", lst]) == [*a, b[0]]
    names, notes = unique_names([*a, b[0]])
    assert names == ["img0", "img1", "img2", "img0_2"] and "img0_2" in notes[0]

    code, _, err = run_cli(
        "predict", tmp_path / "a", lst, "--checkpoint", tmp_path / "m.pt", "--out", tmp_path / "o1",
        "--batch-size", "3", "--save-probs",
    )  # fmt: skip
    assert code == 0, err
    assert "img0_2" in err
    assert Image.open(tmp_path / "o1" / "img0_2.png").size == (30, 24)
    assert Image.open(tmp_path / "o1" / "img0.png").size == (48, 40)
    code, _, err = run_cli(
        "predict", tmp_path / "a", "--checkpoint", tmp_path / "m.pt", "--out", tmp_path / "o2", "--save-probs"
    )
    assert code == 0, err
    for name in ("img0", "img1", "img2"):  # batching same-size images changes nothing
        batched = np.load(tmp_path / "o1" / f"{name}.npz")["probs"].astype(np.float32)
        single = np.load(tmp_path / "o2" / f"{name}.npz")["probs"].astype(np.float32)
        np.testing.assert_allclose(batched, single, atol=2e-3)

    missing = tmp_path / "nope.jpg"
    code, _, err = run_cli("predict", missing, "--checkpoint", tmp_path / "m.pt", "--out", tmp_path / "o3")
    assert code == 2 and "nope.jpg" in err


def test_single_scale_model_and_scale_override(tmp_path, run_cli) -> None:
    tiny_checkpoint(tmp_path / "one.pt", scales=(1.0,))
    small_images(tmp_path / "in", sizes=((40, 48),))
    out = tmp_path / "o"
    code, _, err = run_cli(
        "predict", tmp_path / "in", "--checkpoint", tmp_path / "one.pt", "--out", out,
        "--save-probs", "--save-attention",
    )  # fmt: skip
    assert code == 0, err
    assert "one scale" in err
    assert "attention" not in np.load(out / "img0.npz").files
    assert not list(out.glob("*_attention*"))

    tiny_checkpoint(tmp_path / "att.pt")
    code, _, err = run_cli(
        "predict", tmp_path / "in", "--checkpoint", tmp_path / "att.pt", "--out", out, "--scales", "1.0"
    )
    assert code == 2 and "--scales" in err


def test_predict_crf_uses_checkpoint_crf_section(tmp_path, run_cli, monkeypatch) -> None:
    import pydensecrf.densecrf as dcrf

    seen: list[dict] = []
    real = dcrf.DenseCRF2D

    class Spy:
        def __init__(self, *a):
            self._c = real(*a)

        def __getattr__(self, name):
            return getattr(self._c, name)

        def addPairwiseBilateral(self, **kw):  # noqa: N802
            seen.append({k: v for k, v in kw.items() if k != "rgbim"})
            return self._c.addPairwiseBilateral(**kw)

    monkeypatch.setattr(dcrf, "DenseCRF2D", Spy)
    tiny_checkpoint(tmp_path / "m.pt", config={"crf": {"bi_w": 6.0, "bi_rgb_std": 4.0, "iterations": 2}})
    small_images(tmp_path / "in", sizes=((40, 48),))
    code, _, err = run_cli(
        "predict", tmp_path / "in", "--checkpoint", tmp_path / "m.pt", "--out", tmp_path / "o", "--crf"
    )
    assert code == 0, err
    assert seen == [{"sxy": 121.0, "srgb": 4.0, "compat": 6.0}]
    assert np.asarray(Image.open(tmp_path / "o" / "img0.png")).max() < NUM_CLASSES


def test_predict_probs_flip_is_mirror_consistent() -> None:
    torch.manual_seed(0)
    model = build_model(NUM_CLASSES, scales=SCALES, width=0.0625).eval()
    x = torch.randn(1, 3, 33, 41)
    probs, att = predict_probs(model, x, flip=True)
    probs_m, att_m = predict_probs(model, x.flip(-1), flip=True)
    assert probs.shape == (NUM_CLASSES, 33, 41) and att.shape == (3, 33, 41)
    torch.testing.assert_close(probs, probs_m.flip(-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(att, att_m.flip(-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs.sum(0), torch.ones(33, 41), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        predict_probs(model, torch.randn(2, 3, 8, 8))


def test_resume_skips_images_with_every_output_written(tmp_path, run_cli) -> None:
    tiny_checkpoint(tmp_path / "m.pt")
    paths = small_images(tmp_path / "in", sizes=((40, 48), (36, 40), (32, 36)))
    out = tmp_path / "o"
    args = ("predict", tmp_path / "in", "--checkpoint", tmp_path / "m.pt", "--out", out, "--save-probs")
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    first = paths[0].stem
    (out / f"{first}.npz").unlink()  # as if killed before this image's last file
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, stdout, err = run_cli(*args, "--resume")
    assert code == 0, err
    assert "predicted 1 image(s), skipped 0, 2 already done" in stdout
    assert (out / f"{first}.npz").is_file()
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rewritten = {name for name in before if after[name] != before[name] and not name.startswith(".msattn")}
    assert rewritten <= {f"{first}.png", f"{first}_overlay.jpg"}  # the others were left alone (bookkeeping aside)
    code, stdout, _ = run_cli(*args, "--resume")
    assert code == 0 and "predicted 0 image(s), skipped 0, 3 already done" in stdout


def test_no_overlay_writes_label_pngs_only_as_the_voc_server_wants(tmp_path, run_cli) -> None:
    paths = small_images(tmp_path / "in")
    tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
    code, _, err = run_cli("predict", tmp_path / "in", "--checkpoint", tmp_path / "m.pt", "--out", out, "--no-overlay")
    assert code == 0, err
    outputs = sorted(p.name for p in out.iterdir() if not p.name.startswith(".msattn"))  # bookkeeping aside
    assert outputs == sorted(f"{p.stem}.png" for p in paths)
    label = Image.open(out / "img0.png")
    assert label.mode == "P" and label.size == (48, 40)
