"""msattn export: the whole multi-scale model as one ONNX graph; parity with PyTorch in onnxruntime;
predict --backend onnxruntime; what happens without the optional extra."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msattn.data.transforms import normalize_image
from msattn.export.graph import DeployGraph, grid_steps, scaled_grid_side
from msattn.geometry import grid_side, scaled_side
from msattn.infer.forward import predict_batch
from msattn.models.scale import build_model
from msattn.runtime.checkpoint import make_checkpoint, save_checkpoint

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CLASSES = ["background", "a", "b", "c", "d"]
PALETTE = [[0, 0, 0], [250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0]]
ODD_SIZES = [(1, 1), (2, 3), (17, 9), (61, 75), (100, 33), (130, 257)]


def checkpoint(path: Path, scales=(1.0, 0.75, 0.5), merge: str = "attention", crf: dict | None = None):
    torch.manual_seed(0)
    model = build_model(5, scales=scales, merge=merge, width=0.0625).eval()
    dataset = {"name": "toy", "classes": CLASSES, "palette": PALETTE, "ignore_index": 255, "root": "",
               "mean": list(MEAN), "std": list(STD)}  # fmt: skip
    save_checkpoint(path, make_checkpoint(model, dataset, config={"crf": crf} if crf else {}))
    return model


def random_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def reference(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    batch = torch.stack([normalize_image(img, MEAN, STD) for img in images])
    probs, attention = predict_batch(model, batch)
    return probs.numpy(), None if attention is None else attention.numpy()


# ----------------------------------------------------------------------------- the graph (no ONNX needed)


def test_symbolic_sizes_follow_the_geometry_rules() -> None:
    for side in range(1, 3000):
        assert STRIDE_SIDE(side) == grid_side(side)
    for k in range(0, 700):
        for scale in (0.5, 0.75, 0.6, 0.25, 1.5, 2.0, 1 / 3):
            assert scaled_grid_side(k, scale) == scaled_side(8 * k + 1, scale), (k, scale)


def STRIDE_SIDE(side: int) -> int:  # noqa: N802 - the padded side the graph computes
    return 8 * grid_steps(side) + 1


@pytest.mark.parametrize(
    ("scales", "merge"), [((1.0, 0.75, 0.5), "attention"), ((1.0, 0.5), "max"), ((2.0, 1.0), "avg"), ((1.0,), "avg")]
)
def test_deploy_graph_equals_predict_batch(scales, merge) -> None:
    torch.manual_seed(0)
    model = build_model(5, scales=scales, merge=merge, width=0.0625).eval()
    graph = DeployGraph(model, scales, MEAN, STD, argmax=True).eval()
    for h, w in ODD_SIZES[:5]:
        images = random_images(2, h, w, seed=h + w)
        probs, attention = reference(model, images)
        with torch.no_grad():
            outputs = graph(torch.from_numpy(images))
        np.testing.assert_allclose(outputs[0].numpy(), probs, atol=1e-5)
        if attention is None:
            assert len(outputs) == 2 and graph.output_names() == ["probs", "labels"]
        else:
            np.testing.assert_allclose(outputs[1].numpy(), attention, atol=1e-5)
        assert outputs[-1].dtype == torch.uint8 and (outputs[-1].numpy() == probs.argmax(1)).all()


def test_scales_given_in_another_order_follow_the_attention_heads_order() -> None:
    torch.manual_seed(0)
    model = build_model(5, scales=(1.0, 0.5), merge="attention", width=0.0625).eval()
    graph = DeployGraph(model, (0.5, 1.0), MEAN, STD)
    assert graph.scales == (1.0, 0.5)


# ----------------------------------------------------------------------------- ONNX and onnxruntime

onnx_extra = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="optional extra msattn[export] (onnx, onnxscript, onnxruntime) is not installed",
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, torch.nn.Module, Path]:
    """A 3-scale attention model exported through the CLI (dynamic size), once for the module."""
    from msattn.cli.app import main

    folder = tmp_path_factory.mktemp("export")
    model = checkpoint(folder / "m.pt", crf={"bi_w": 5.0})
    try:
        main(["export", "--checkpoint", str(folder / "m.pt"), "--out", str(folder / "m.onnx")])
    except SystemExit as exc:
        assert not exc.code
    return folder / "m.onnx", model, folder / "m.pt"


@onnx_extra
@pytest.mark.slow
def test_onnx_parity_on_odd_sizes_and_batches(exported) -> None:
    from msattn.export.runtime import OnnxSession

    path, model, _ = exported
    session = OnnxSession(path)
    for i, (h, w) in enumerate(ODD_SIZES):
        images = random_images(2 if i % 2 else 1, h, w, seed=i)
        probs, attention = reference(model, images)
        out = session.run(images)
        assert out["probs"].shape == probs.shape and out["probs"].dtype == np.float32
        assert np.abs(out["probs"] - probs).max() <= 1e-3
        assert (out["probs"].argmax(1) == probs.argmax(1)).mean() >= 0.999
        assert np.abs(out["attention"] - attention).max() <= 1e-3


@onnx_extra
@pytest.mark.slow
def test_onnx_file_is_dynamic_and_carries_its_metadata(exported) -> None:
    import onnx

    path, _, ckpt = exported
    proto = onnx.load(str(path))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "height", "width", 3]
    assert [o.name for o in proto.graph.output] == ["probs", "attention"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["msattn.classes"]) == CLASSES and json.loads(meta["msattn.palette"]) == PALETTE
    assert json.loads(meta["msattn.scales"]) == [1.0, 0.75, 0.5] and meta["msattn.merge"] == "attention"
    assert meta["msattn.checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["msattn.normalization"] == "inside" and json.loads(meta["msattn.mean"]) == list(MEAN)
    assert json.loads(meta["msattn.crf"]) == {"bi_w": 5.0} and meta["msattn.version"]
    assert int(meta["msattn.opset"]) >= 18 and proto.producer_name == "msattn"


@onnx_extra
@pytest.mark.slow
def test_predict_backend_onnxruntime_writes_what_torch_writes(exported, tmp_path, run_cli) -> None:
    path, _, ckpt = exported
    folder = tmp_path / "in"
    folder.mkdir()
    for i, (h, w) in enumerate([(75, 61), (140, 190)]):
        Image.fromarray(random_images(1, h, w, seed=10 + i)[0]).save(folder / f"img{i}.png")
    runs = {
        "torch": ("--checkpoint", ckpt),
        "onnx": ("--backend", "onnxruntime", "--model", path),
        "onnx_tiled": ("--model", path, "--tile", "97", "--overlap", "32"),
        "torch_tiled": ("--checkpoint", ckpt, "--tile", "97", "--overlap", "32"),
    }
    for name, args in runs.items():
        code, _, err = run_cli("predict", folder, *args, "--out", tmp_path / name, "--save-probs", "--save-attention",
                               "--device", "cpu")  # fmt: skip
        assert code == 0, err
    for a, b in (("torch", "onnx"), ("torch_tiled", "onnx_tiled")):
        assert sorted(p.name for p in (tmp_path / a).iterdir()) == sorted(p.name for p in (tmp_path / b).iterdir())
        for i in range(2):
            pa, pb = (np.load(tmp_path / run / f"img{i}.npz") for run in (a, b))
            assert np.abs(pa["probs"].astype(np.float32) - pb["probs"].astype(np.float32)).max() <= 2e-3
            assert np.abs(pa["attention"].astype(np.float32) - pb["attention"].astype(np.float32)).max() <= 2e-3
            la, lb = (np.array(Image.open(tmp_path / run / f"img{i}.png")) for run in (a, b))
            assert (la == lb).mean() >= 0.999
            assert list(pb["classes"]) == CLASSES


@onnx_extra
@pytest.mark.slow
def test_static_max_merge_export_with_argmax(tmp_path, capsys) -> None:
    from msattn.export.onnx import export_checkpoint
    from msattn.export.runtime import OnnxSession

    model = checkpoint(tmp_path / "m.pt", scales=(1.0, 0.5), merge="max")
    summary = export_checkpoint(tmp_path / "m.pt", tmp_path / "m.onnx", dynamic=False, size="40x48", argmax=True)
    out, err = capsys.readouterr()
    stages = [line.split(":")[0] for line in err.splitlines()]  # a line as each stage starts and ends, on stderr
    assert stages == ["export", "export", "verify"], err
    assert "torch.export, then ONNX" in err and "wrote" in err.splitlines()[1] and "onnxruntime" in err
    assert out.startswith(f"wrote {tmp_path / 'm.onnx'}") and len(out.splitlines()) == 1
    assert summary["outputs"] == ["probs", "attention", "labels"] and summary["verify"]["max_abs_diff"] <= 1e-3
    session = OnnxSession(tmp_path / "m.onnx")
    images = random_images(1, 40, 48)
    out = session.run(images)
    probs, attention = reference(model, images)
    assert np.abs(out["probs"] - probs).max() <= 1e-3 and (out["attention"] == attention).all()  # one-hot winners
    assert out["labels"].dtype == np.uint8 and (out["labels"] == probs.argmax(1)).all()
    with pytest.raises(Exception, match="dimension|shape|Got"):
        session.run(random_images(1, 41, 48))  # a static graph takes its own size only


@onnx_extra
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--opset", "12"), "--opset: the exporter writes opset 18 or newer"),
        (("--scales", "1.0"), "--scales: this attention model was trained on 3 scales"),
        (("--size", "big", "--static"), "--size: expected HEIGHTxWIDTH"),
    ],
)
def test_bad_export_options_are_one_line_errors(tmp_path, run_cli, args, message) -> None:
    checkpoint(tmp_path / "m.pt")
    code, _, err = run_cli("export", "--checkpoint", tmp_path / "m.pt", "--out", tmp_path / "m.onnx", *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "m.onnx").exists()


@onnx_extra
def test_export_never_writes_over_a_file_it_did_not_make(tmp_path, run_cli) -> None:
    checkpoint(tmp_path / "m.pt")
    (tmp_path / "notes.onnx").write_text("mine")
    code, _, err = run_cli("export", "--checkpoint", tmp_path / "m.pt", "--out", tmp_path / "notes.onnx")
    assert code == 2 and "was not written by msattn export" in err
    assert (tmp_path / "notes.onnx").read_text() == "mine"
    code, _, err = run_cli("export", "--checkpoint", tmp_path / "m.pt", "--out", tmp_path / "m.pt")
    assert code == 2 and "must be an .onnx file" in err


@onnx_extra
def test_onnx_backend_refuses_what_it_cannot_do(tmp_path, run_cli) -> None:
    (tmp_path / "fake.onnx").write_bytes(b"not onnx")
    Image.fromarray(random_images(1, 20, 20)[0]).save(tmp_path / "a.png")
    code, _, err = run_cli("predict", tmp_path / "a.png", "--model", tmp_path / "fake.onnx", "--out", tmp_path / "o")
    assert code == 2 and "fake.onnx: onnxruntime cannot load it" in err
    code, _, err = run_cli("predict", tmp_path / "a.png", "--backend", "onnxruntime", "--out", tmp_path / "o")
    assert code == 2 and "needs an exported model" in err
    code, _, err = run_cli("predict", tmp_path / "a.png", "--out", tmp_path / "o")
    assert code == 2 and "--checkpoint: the torch backend needs a checkpoint" in err


def test_missing_extra_says_how_to_install_it(tmp_path, run_cli, monkeypatch) -> None:
    checkpoint(tmp_path / "m.pt")
    Image.fromarray(random_images(1, 20, 20)[0]).save(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = run_cli("export", "--checkpoint", tmp_path / "m.pt", "--out", tmp_path / "m.onnx")
    assert code == 1 and "pip install 'msattn[export]'" in err and "Traceback" not in err, err
    code, _, err = run_cli("predict", tmp_path / "a.png", "--model", tmp_path / "m.onnx", "--out", tmp_path / "o")
    assert code == 1 and "onnxruntime" in err and "pip install 'msattn[export]'" in err, err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "o").exists()


@onnx_extra
@pytest.mark.slow
def test_readme_deploy_snippet_runs_without_msattn(exported, tmp_path, monkeypatch) -> None:
    import shutil
    import subprocess

    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8").split("<!-- deploy-snippet -->", 1)[1]
    code = text.split("```python", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 12
    path, model, _ = exported
    shutil.copy(path, tmp_path / "voc.onnx")
    image = random_images(1, 53, 71, seed=5)
    Image.fromarray(image[0]).save(tmp_path / "photo.jpg", quality=100)
    (tmp_path / "snippet.py").write_text(code)
    # a fresh interpreter that cannot import msattn: the snippet needs numpy, Pillow and onnxruntime only
    env = {"PYTHONPATH": "", "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    probe = "import sys; sys.modules['msattn'] = None; exec(open('snippet.py').read())"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = Image.open(tmp_path / "photo.png")
    decoded = np.asarray(Image.open(tmp_path / "photo.jpg").convert("RGB"))[None]
    probs, _ = reference(model, decoded)
    assert written.mode == "P" and (np.array(written) == probs[0].argmax(0)).mean() >= 0.999
    assert written.getpalette()[3:6] == PALETTE[1]
