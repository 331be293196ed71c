"""Dense CRF: refinement quality on a synthetic image, parameter plumbing, crf-refine CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msattn.config.crf import CRFParams, crf_params_from_dict
from msattn.crf.dense import dense_crf
from msattn.crf.files import confusion_matrix, load_crf_params, mean_iou, resolve_params
from msattn.errors import ConfigError

H, W = 40, 56


def two_regions(seed: int = 0, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 [H,W,3], truth [H,W], speckled probs [2,H,W]): dark left, bright right, ``noise`` of
    the pixels confidently wrong in the unary."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((H, W), dtype=np.int64)
    truth[:, W // 2 :] = 1
    image = np.where(truth[..., None] == 1, 210, 40).astype(np.int64)
    image = np.clip(image + rng.integers(-3, 4, size=(H, W, 3)), 0, 255).astype(np.uint8)
    noisy = np.where(rng.random((H, W)) < noise, 1 - truth, truth)
    p = np.where(noisy == 1, 0.7, 0.3).astype(np.float32)
    return image, truth, np.stack([1 - p, p])


def write_case(root: Path, names: list[str], seed: int = 0) -> tuple[Path, Path, Path]:
    """images/<name>.png, probs/<name>.npz (float16 probs + palette), labels/<name>.png."""
    images, probs, labels = root / "images", root / "probs", root / "labels"
    for d in (images, probs, labels):
        d.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        image, truth, p = two_regions(seed + k)
        Image.fromarray(image).save(images / f"{name}.png")
        palette = np.array([[0, 0, 0], [200, 30, 30]], dtype=np.uint8)
        np.savez_compressed(probs / f"{name}.npz", probs=p.astype(np.float16), palette=palette)
        label = Image.fromarray(truth.astype(np.uint8)).convert("P")
        label.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
        label.save(labels / f"{name}.png")
    return images, probs, labels


class SpyCRF:
    """Stands in for pydensecrf.densecrf.DenseCRF2D, recording calls and delegating to the real one."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, width: int, height: int, classes: int) -> None:
        import pydensecrf.densecrf as dcrf

        self._crf = dcrf._real_DenseCRF2D(width, height, classes)

    def setUnaryEnergy(self, unary):  # noqa: N802 - pydensecrf's names
        SpyCRF.calls.append(("unary", {"shape": unary.shape}))
        return self._crf.setUnaryEnergy(unary)

    def addPairwiseGaussian(self, **kw):  # noqa: N802
        SpyCRF.calls.append(("gaussian", kw))
        return self._crf.addPairwiseGaussian(**kw)

    def addPairwiseBilateral(self, **kw):  # noqa: N802
        SpyCRF.calls.append(("bilateral", {k: v for k, v in kw.items() if k != "rgbim"}))
        return self._crf.addPairwiseBilateral(**kw)

    def inference(self, n):
        SpyCRF.calls.append(("inference", {"n": n}))
        return self._crf.inference(n)


@pytest.fixture
def spy(monkeypatch):
    import pydensecrf.densecrf as dcrf

    monkeypatch.setattr(dcrf, "_real_DenseCRF2D", dcrf.DenseCRF2D, raising=False)
    monkeypatch.setattr(dcrf, "DenseCRF2D", SpyCRF)
    SpyCRF.calls = []
    return SpyCRF


def calls_of(spy, kind: str) -> list[dict]:
    return [kw for k, kw in spy.calls if k == kind]


# ----------------------------------------------------------------------------- dense_crf


def test_crf_recovers_regions_from_speckled_unary() -> None:
    image, truth, probs = two_regions()
    argmax_err = (probs.argmax(0) != truth).mean()
    refined = dense_crf(image, probs, CRFParams())
    crf_err = (refined.argmax(0) != truth).mean()
    assert refined.shape == probs.shape and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-4)
    assert argmax_err > 0.2
    assert crf_err < 0.25 * argmax_err  # the speckle is mostly cleaned up
    assert crf_err < 0.05


def test_crf_without_pairwise_weight_keeps_argmax_and_clips_zero_probs() -> None:
    image, _, probs = two_regions()
    probs = np.where(probs > 0.5, 1.0, 0.0).astype(np.float32)  # zeros would give -log 0 = inf
    refined = dense_crf(image, probs, CRFParams(bi_w=1e-6, pos_w=1e-6, iterations=3))
    assert np.isfinite(refined).all()
    np.testing.assert_array_equal(refined.argmax(0), probs.argmax(0))
    with pytest.raises(ValueError):
        dense_crf(image[:10], probs)


# ----------------------------------------------------------------------------- parameters


def test_params_validate() -> None:
    assert CRFParams() == CRFParams(4.0, 121.0, 5.0, 3.0, 3.0, 10)
    for bad in ({"bi_w": 0}, {"bi_xy_std": -1.0}, {"iterations": 0}, {"iterations": 2.5}, {"pos_w": True}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            CRFParams(**bad)
    with pytest.raises(ConfigError, match=r"r\.toml: unknown key crf\.bogus"):
        crf_params_from_dict({"bogus": 1}, "r.toml")
    assert crf_params_from_dict({"bi_w": 5}).bi_w == 5.0


def test_recipe_section_and_cli_precedence(tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nwidth = 1.0\n[crf]\nbi_w = 6\nbi_rgb_std = 7.5\niterations = 4\n')
    params = resolve_params({"bi_w": 2.0, "bi_xy_std": None}, recipe)
    assert params == CRFParams(bi_w=2.0, bi_xy_std=121.0, bi_rgb_std=7.5, iterations=4)
    assert load_crf_params(recipe).bi_w == 6.0
    bad = tmp_path / "bad.toml"
    bad.write_text("[crf]\nbi_wt = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*crf\.bi_wt"):
        load_crf_params(bad)
    bad.write_text("[crf]\nbi_w = -3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*crf\.bi_w"):
        load_crf_params(bad)
    bad.write_text("[crf\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_crf_params(bad)


def test_confusion_and_miou() -> None:
    label = np.array([[0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 0]])
    cm = confusion_matrix(pred, label, 2)
    np.testing.assert_array_equal(cm, [[1, 1], [0, 1]])
    assert mean_iou(cm) == pytest.approx((1 / 2 + 1 / 2) / 2)


# ----------------------------------------------------------------------------- crf-refine


def test_params_from_recipe_and_cli_reach_pydensecrf(tmp_path, run_cli, spy) -> None:
    images, probs, _ = write_case(tmp_path, ["a"])
    recipe = tmp_path / "r.toml"
    recipe.write_text("[crf]\nbi_w = 7\nbi_rgb_std = 9\npos_xy_std = 2\niterations = 4\n")
    code, _, err = run_cli(
        "crf-refine", "--images", images, "--probs", probs, "--out", tmp_path / "o",
        "--recipe", recipe, "--bi-xy-std", "33", "--pos-w", "1.5", "--workers", "0",
    )  # fmt: skip
    assert code == 0, err
    assert calls_of(spy, "bilateral") == [{"sxy": 33.0, "srgb": 9.0, "compat": 7.0}]
    assert calls_of(spy, "gaussian") == [{"sxy": 2.0, "compat": 1.5}]
    assert calls_of(spy, "inference") == [{"n": 4}]
    assert calls_of(spy, "unary") == [{"shape": (2, H * W)}]


def test_crf_refine_end_to_end_with_workers_and_resume(tmp_path, run_cli) -> None:
    images, probs, _ = write_case(tmp_path, ["a", "b", "c"])
    out = tmp_path / "refined"
    code, stdout, err = run_cli("crf-refine", "--images", images, "--probs", probs, "--out", out, "--workers", "2")
    assert code == 0, err
    assert "refined 3" in stdout
    for k, name in enumerate("abc"):
        img = Image.open(out / f"{name}.png")
        assert img.mode == "P" and img.size == (W, H)
        assert img.getpalette()[3:6] == [200, 30, 30]  # the palette stored in the npz
        image, truth, p = two_regions(k)
        expected = dense_crf(image, p.astype(np.float16).astype(np.float32)).argmax(0)
        np.testing.assert_array_equal(np.asarray(img), expected)
        assert (np.asarray(img) != truth).mean() < 0.05
    stamp = (out / "a.png").stat().st_mtime_ns
    (out / "b.png").unlink()
    code, stdout, err = run_cli("crf-refine", "--images", images, "--probs", probs, "--out", out, "--workers", "0")
    assert code == 0, err
    assert "refined 1, already done 2" in stdout
    assert (out / "a.png").stat().st_mtime_ns == stamp and (out / "b.png").is_file()


def test_crf_refine_skips_missing_and_corrupt_inputs(tmp_path, run_cli) -> None:
    images, probs, _ = write_case(tmp_path, ["good", "noimage", "badnpz", "badimage"])
    (images / "noimage.png").unlink()
    (probs / "badnpz.npz").write_bytes(b"not a zip file")
    (images / "badimage.png").write_bytes(b"")
    out = tmp_path / "o"
    code, stdout, err = run_cli("crf-refine", "--images", images, "--probs", probs, "--out", out, "--workers", "0")
    assert code == 0, err
    assert "refined 1" in stdout and "failed 3" in stdout
    for name in ("noimage", "badnpz", "badimage"):
        assert name in err
        assert not (out / f"{name}.png").exists()
    assert (out / "good.png").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]

    (images / "good.png").unlink()
    (out / "good.png").unlink()
    code, _, err = run_cli("crf-refine", "--images", images, "--probs", probs, "--out", out, "--workers", "0")
    assert code == 2 and "msattn: error:" in err and "none of the 4" in err


def test_crf_refine_bad_arguments(tmp_path, run_cli) -> None:
    images, probs, _ = write_case(tmp_path, ["a"])
    code, _, err = run_cli("crf-refine", "--images", images, "--probs", tmp_path / "nope", "--out", tmp_path / "o")
    assert code == 2 and "nope" in err
    code, _, err = run_cli("crf-refine", "--images", images, "--probs", probs, "--out", tmp_path / "o", "--search")
    assert code == 2 and "--labels" in err
    code, _, err = run_cli(
        "crf-refine", "--images", images, "--probs", probs, "--out", tmp_path / "o", "--bi-w", "-1"
    )
    assert code == 2 and "bi_w" in err


def test_crf_search_prints_best_setting(tmp_path, run_cli) -> None:
    images, probs, labels = write_case(tmp_path, ["a", "b"])
    out = tmp_path / "search"
    code, stdout, err = run_cli(
        "crf-refine", "--images", images, "--probs", probs, "--out", out,
        "--labels", labels, "--search", "--workers", "0", "--iterations", "5",
    )  # fmt: skip
    assert code == 0, err
    assert "best: --bi-w" in stdout and "no CRF" in stdout
    result = json.loads((out / "crf_search.json").read_text())
    rows = result["results"]
    assert len(rows) == 1 + 27
    baseline = next(r for r in rows if r["params"] is None)
    assert baseline["miou"] < 0.6  # 30 % speckle
    assert result["best"]["miou"] == max(r["miou"] for r in rows) > 0.9
    assert result["best"]["iterations"] == 5  # non-grid settings come from the CLI
    assert f"{100 * result['best']['miou']:.2f}" in stdout


def test_crf_search_keeps_command_line_settings_fixed(tmp_path, run_cli) -> None:
    images, probs, labels = write_case(tmp_path, ["a"])
    out = tmp_path / "search"
    code, _, err = run_cli(
        "crf-refine", "--images", images, "--probs", probs, "--out", out, "--labels", labels,
        "--search", "--workers", "0", "--iterations", "2", "--bi-w", "4", "--bi-rgb-std", "5",
    )  # fmt: skip
    assert code == 0, err
    rows = [r for r in json.loads((out / "crf_search.json").read_text())["results"] if r["params"] is not None]
    assert len(rows) == 3  # only bi_xy_std is searched
    assert {r["params"]["bi_w"] for r in rows} == {4.0} and {r["params"]["bi_rgb_std"] for r in rows} == {5.0}
    assert {r["params"]["bi_xy_std"] for r in rows} == {50.0, 80.0, 121.0}
