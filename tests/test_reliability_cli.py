"""Bad inputs through the real CLI: one table, one line each, the right exit code, nothing written.

Every row of :data:`CASES` runs ``msattn ARGS`` in-process (``msattn.cli.app.main``) against a small
world of good and broken files built once per module, and checks:

- the exit code (2: usage/input error, 1: runtime failure);
- the message: one ``msattn: error: ...`` line on stderr holding the expected text (which names
  the file or key), and no ``Traceback`` anywhere;
- nothing else written: the world's file listing (paths, sizes, mtimes) is unchanged before and
  after, except for the paths the row allows (the bookkeeping a failed ``prepare-data`` keeps:
  its marker, ``prepare_report.json`` and empty folders), and no ``.tmp-`` file anywhere.

``len(CASES)`` is the count the README's reliability section cites.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_helpers import box, coco_images, pattern_image, write_coco, write_jpeg, write_pascal_part_mat
from engine_helpers import CLASSES, PALETTE, make_tiny_dataset, write_recipe
from PIL import Image

from msattn.cli.app import main
from msattn.models.scale import ScaleNet, build_model
from msattn.runtime.checkpoint import make_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """One bad input: ``argv`` and ``message`` may use ``{w}`` (the world folder)."""

    id: str
    argv: tuple[str, ...]
    code: int
    message: str
    writes: tuple[str, ...] = ()  # glob patterns (relative to the world) that may appear
    patch: str | None = None  # key of PATCHES: a fault injected with monkeypatch
    env: dict[str, str] = field(default_factory=dict)
    one_line: bool = True  # False only for Click's own usage errors (boxed, still no traceback)


def prepare_bookkeeping(out: str) -> tuple[str, ...]:
    """What a prepare-data run that produced nothing keeps: the settings marker, the problem report, empty folders
    and the lock's files."""
    return (out, f"{out}/images", f"{out}/labels", f"{out}/.msattn-prepare.json", f"{out}/prepare_report.json",
            f"{out}/.msattn.lock", f"{out}/.msattn.lock.json")  # fmt: skip


W = "{w}"
CKPT = f"{W}/ckpt/ok.pt"
PREDICT = ("predict", f"{W}/in/good.jpg", "--device", "cpu", "--out")  # + out folder, --checkpoint ...
EVAL = ("evaluate", "--checkpoint", CKPT, "--device", "cpu", "--data")  # + dataset folder
TRAIN = ("train", "--device", "cpu", "--out", f"{W}/runs/x")  # + recipe

CASES: list[Case] = [
    # --- images: corrupt, empty, too large
    Case("truncated-jpeg-predict", ("predict", f"{W}/in/trunc.jpg", "--checkpoint", CKPT, "--out", f"{W}/out/p1"),
         2, "in/trunc.jpg: cannot read image"),
    Case("truncated-jpeg-prepare", ("prepare-data", "person-part", "--source", f"{W}/src/pp_trunc", "--out",
                                    f"{W}/out/pp_trunc", "-j", "0"),
         2, "JPEGImages/2008_000652.jpg: cannot read image", prepare_bookkeeping("out/pp_trunc")),
    Case("zero-byte-png-predict", ("predict", f"{W}/in/zero.png", "--checkpoint", CKPT, "--out", f"{W}/out/p2"),
         2, "in/zero.png: cannot read image"),
    Case("zero-byte-png-label-prepare", ("prepare-data", "voc", "--voc", f"{W}/src/voc_zero", "--out",
                                         f"{W}/out/voc_zero", "-j", "0"),
         2, "SegmentationClass/2007_000129.png: cannot read image", prepare_bookkeeping("out/voc_zero")),
    Case("zero-byte-png-label-evaluate", (*EVAL, f"{W}/data/zero_label"), 2, "labels/val_000.png: cannot read image"),
    Case("image-over-pixel-limit-predict", ("--max-pixels", "1000", "predict", f"{W}/in/good.jpg", "--checkpoint",
                                            CKPT, "--out", f"{W}/out/p3"),
         2, "in/good.jpg: image has 48x40 = 1920 pixels, over the limit of 1000"),
    Case("image-over-pixel-limit-prepare-worker", ("--max-pixels", "100", "prepare-data", "voc", "--voc",
                                                   f"{W}/src/voc_ok", "--out", f"{W}/out/voc_big", "-j", "1"),
         2, "over the limit of 100", prepare_bookkeeping("out/voc_big")),
    Case("pixel-limit-env-malformed", ("prepare-data", "coco", "--coco", f"{W}/src/coco_noann", "--out",
                                       f"{W}/out/c0"),
         2, "MSATTN_MAX_PIXELS='lots': expected a whole number", env={"MSATTN_MAX_PIXELS": "lots"}),
    # --- labels
    Case("label-class-200-evaluate", (*EVAL, f"{W}/data/label200"), 2,
         "labels/val_000.png: label values 200 outside 0..2"),
    Case("label-class-200-prepare", ("prepare-data", "voc", "--voc", f"{W}/src/voc_200", "--out", f"{W}/out/voc_200",
                                     "-j", "0"),
         2, "SegmentationClass/2007_000129.png: label values 200 outside the class range 0..20",
         prepare_bookkeeping("out/voc_200")),
    Case("label-class-200-train-loader-worker", ("train", f"{W}/recipes/label200_worker.toml", "--device", "cpu",
                                                 "--out", f"{W}/runs/worker"),
         2, "labels/train_000.png: label values 200 outside 0..2"),  # fails in its first step: writes nothing
    Case("label-class-200-train-precheck", ("train", f"{W}/recipes/label200_check.toml", "--device", "cpu",
                                             "--out", f"{W}/runs/precheck"),
         2, "train_000.png: label values 200"),  # found by the sampled check before the first step
    Case("label-size-mismatch-evaluate", (*EVAL, f"{W}/data/size_mismatch"), 2,
         "labels/val_000.png: label is 32x30, image is 32x32"),
    # --- annotation sources
    Case("mat-without-anno", ("prepare-data", "person-part", "--source", f"{W}/src/pp_noanno", "--out",
                              f"{W}/out/pp_noanno", "-j", "0"),
         2, "Annotations_Part/2008_000652.mat: not a readable Pascal-Part annotation (KeyError: 'anno')",
         prepare_bookkeeping("out/pp_noanno")),
    Case("coco-json-without-annotations", ("prepare-data", "coco", "--coco", f"{W}/src/coco_noann", "--out",
                                           f"{W}/out/coco_noann"),
         2, "instances_train2014.json: not a COCO instances file (needs lists 'images', 'annotations'"),
    Case("coco-file-name-with-dotdot", ("prepare-data", "coco", "--coco", f"{W}/src/coco_dotdot", "--out",
                                        f"{W}/out/coco_dotdot", "-j", "0"),
         2, "instances_train2014.json: invalid id '../outside.jpg'"),
    Case("missing-source-folder", ("prepare-data", "person-part", "--source", f"{W}/src/nowhere", "--out",
                                   f"{W}/out/nowhere"),
         2, "src/nowhere/Annotations_Part: folder not found"),
    Case("prepare-out-is-a-file", ("prepare-data", "demo", "--out", f"{W}/in/good.jpg"), 2,
         "in/good.jpg: exists and is not a folder"),
    # --- dataset folders and id lists
    Case("list-file-with-dotdot", (*EVAL, f"{W}/data/dotdot"), 2, "dotdot/val.txt: invalid id '../x'"),
    Case("list-file-with-slash-train", ("train", f"{W}/recipes/slash_split.toml", "--device", "cpu", "--out",
                                        f"{W}/runs/slash"),
         2, "slash/train.txt: invalid id 'sub/train_000'"),
    Case("split-name-with-dotdot", ("evaluate", "--checkpoint", CKPT, "--device", "cpu", "--data",
                                    f"{W}/data/good", "--split", "../good/val"),
         2, "--split: invalid id '../good/val'"),
    Case("list-file-empty", (*EVAL, f"{W}/data/empty_list"), 2, "empty_list/val.txt: lists no ids"),
    Case("listed-image-missing", (*EVAL, f"{W}/data/missing_image"), 2,
         "images/val_001.jpg: file not found (1 of the 2 ids"),
    Case("dataset-json-malformed", (*EVAL, f"{W}/data/bad_json"), 2, "bad_json/dataset.json: not valid JSON"),
    Case("dataset-folder-missing", (*EVAL, f"{W}/data/nowhere"), 2, "data/nowhere: dataset folder not found"),
    Case("dataset-folder-missing-train", ("train", f"{W}/recipes/no_data.toml", "--device", "cpu", "--out",
                                          f"{W}/runs/nodata"),
         2, "data/nowhere: no dataset folder here (dataset.json missing)"),
    # --- recipes and overrides
    Case("recipe-unknown-key", ("train", f"{W}/recipes/unknown_key.toml", *TRAIN[1:]), 2,
         "unknown_key.toml: unknown key optim.learning_rate"),
    Case("recipe-unknown-section", ("train", f"{W}/recipes/unknown_section.toml", *TRAIN[1:]), 2,
         "unknown_section.toml: unknown section [optimiser]"),
    Case("recipe-wrong-type", ("train", f"{W}/recipes/wrong_type.toml", *TRAIN[1:]), 2,
         "wrong_type.toml: optim.lr must be a number, got a string ('fast')"),
    Case("recipe-int-for-bool", ("train", f"{W}/recipes/int_for_bool.toml", *TRAIN[1:]), 2,
         "int_for_bool.toml: data.flip must be true or false"),
    Case("recipe-not-toml", ("train", f"{W}/recipes/not_toml.toml", *TRAIN[1:]), 2, "not_toml.toml: not valid TOML"),
    Case("recipe-missing", ("train", f"{W}/recipes/nowhere.toml", *TRAIN[1:]), 2, "nowhere.toml: recipe not found"),
    Case("set-without-equals", ("train", f"{W}/recipes/good.toml", "--set", "optim.lr", *TRAIN[1:]), 2,
         "--set optim.lr: expected section.key=value"),
    Case("set-unknown-key", ("train", f"{W}/recipes/good.toml", "--set", "optim.rate=0.1", *TRAIN[1:]), 2,
         "--set optim.rate=0.1: unknown key optim.rate"),
    Case("set-bad-value", ("train", f"{W}/recipes/good.toml", "--set", "train.iterations=-3", *TRAIN[1:]), 2,
         "--set train.iterations=-3: train.iterations must be >= 1"),
    Case("crf-recipe-bad-value", ("crf-refine", "--images", f"{W}/crf/images", "--probs", f"{W}/crf/probs_ok",
                                  "--out", f"{W}/out/crf0", "--recipe", f"{W}/recipes/bad_crf.toml"),
         2, "bad_crf.toml: crf.bi_w must be a positive number"),
    Case("train-out-is-a-file", ("train", f"{W}/recipes/good.toml", "--device", "cpu", "--out", f"{W}/in/good.jpg"),
         2, "in/good.jpg: exists and is not a folder"),
    # --- checkpoints
    Case("checkpoint-missing", (*PREDICT, f"{W}/out/p4", "--checkpoint", f"{W}/ckpt/nowhere.pt"), 2,
         "ckpt/nowhere.pt: checkpoint not found"),
    Case("checkpoint-with-pickled-object", (*PREDICT, f"{W}/out/p5", "--checkpoint", f"{W}/ckpt/pickled.pt"), 2,
         "ckpt/pickled.pt: not a loadable msattn checkpoint: it contains pickled Python objects"),
    Case("checkpoint-from-another-tool", ("evaluate", "--checkpoint", f"{W}/ckpt/other_tool.pt", "--device", "cpu",
                                          "--data", f"{W}/data/good"),
         2, "ckpt/other_tool.pt: not an msattn checkpoint (made by another tool?)"),
    Case("checkpoint-newer-format", (*PREDICT, f"{W}/out/p6", "--checkpoint", f"{W}/ckpt/newer.pt"), 2,
         "ckpt/newer.pt: checkpoint format 99 is newer"),
    Case("checkpoint-truncated", (*PREDICT, f"{W}/out/p7", "--checkpoint", f"{W}/ckpt/truncated.pt"), 2,
         "ckpt/truncated.pt: not a loadable msattn checkpoint"),
    Case("checkpoint-weights-mismatch", (*PREDICT, f"{W}/out/p8", "--checkpoint", f"{W}/ckpt/mismatch.pt"), 2,
         "ckpt/mismatch.pt: model weights do not match the stored model arguments"),
    # --- predict / crf-refine arguments
    Case("predict-input-missing", ("predict", f"{W}/in/nowhere.jpg", "--checkpoint", CKPT, "--out",
                                   f"{W}/out/p9"),
         2, "in/nowhere.jpg: input not found"),
    Case("predict-list-entry-missing", ("predict", f"{W}/in/list.txt", "--checkpoint", CKPT, "--device", "cpu",
                                        "--out", f"{W}/out/p10"),
         2, "could be read; first: {w}/in/gone.jpg: file not found"),
    Case("predict-out-is-a-file", (*PREDICT, f"{W}/in/zero.png", "--checkpoint", CKPT), 2,
         "in/zero.png: exists and is not a folder"),
    Case("predict-wrong-scale-count", (*PREDICT, f"{W}/out/p11", "--checkpoint", CKPT, "--scales", "1.0"), 2,
         "--scales: this attention model was trained on 2 scales"),
    Case("unknown-option", ("predict", "--bogus"), 2, "No such option: --bogus", one_line=False),
    Case("corrupt-npz-crf-refine", ("crf-refine", "--images", f"{W}/crf/images", "--probs", f"{W}/crf/probs_bad",
                                    "--out", f"{W}/out/crf1", "--workers", "0"),
         2, "probs_bad/a.npz: cannot read probabilities"),
    # --- missing optional dependency, resources
    Case("pydensecrf-missing", ("crf-refine", "--images", f"{W}/crf/images", "--probs", f"{W}/crf/probs_ok",
                                "--out", f"{W}/out/crf2", "--workers", "0"),
         1, "install it with: pip install pydensecrf2", patch="no_pydensecrf"),
    Case("pydensecrf-missing-predict", (*PREDICT, f"{W}/out/p12", "--checkpoint", CKPT, "--crf"), 1,
         "pip install pydensecrf2", patch="no_pydensecrf"),
    Case("gpu-oom-predict", (*PREDICT, f"{W}/out/p13", "--checkpoint", CKPT), 1,
         "out of GPU memory on good (48x40, scales [1.0, 0.5]) even alone: give smaller --scales", patch="oom"),
    Case("gpu-oom-train", ("train", f"{W}/recipes/good.toml", "--device", "cpu", "--out", f"{W}/runs/oom"), 1,
         "lower train.micro_batch (accumulation keeps the batch), data.crop_size or the scales", patch="oom"),
    Case("gpu-oom-evaluate", (*EVAL, f"{W}/data/good"), 1, "out of GPU memory: lower the batch size", patch="oom"),
    # --- issue 14: outputs never overwrite inputs or a user's files
    Case("predict-out-is-the-input-folder", ("predict", f"{W}/in/good.jpg", "--checkpoint", CKPT, "--out", f"{W}/in"),
         2, "--out {w}/in: is the folder of the input images"),
    Case("predict-out-holds-a-users-file", (*PREDICT, f"{W}/user_out", "--checkpoint", CKPT), 2,
         "user_out: holds 1 file(s) that msattn predict would write but did not make (good.png)"),
    Case("crf-out-is-the-probs-folder", ("crf-refine", "--images", f"{W}/crf/images", "--probs", f"{W}/crf/probs_ok",
                                         "--out", f"{W}/crf/probs_ok", "--workers", "0"),
         2, "--out {w}/crf/probs_ok: is the folder of the --probs"),
    Case("prepare-out-is-the-source", ("prepare-data", "voc", "--voc", f"{W}/src/voc_ok", "--out", f"{W}/src/voc_ok"),
         2, "--out {w}/src/voc_ok: is the --voc folder"),
    Case("evaluate-json-is-a-folder", (*EVAL, f"{W}/data/good", "--json", f"{W}/out"), 2,
         "--json {w}/out: is a folder"),
    Case("evaluate-json-over-an-input", (*EVAL, f"{W}/data/good", "--json", f"{W}/data/good/dataset.json"), 2,
         "good/dataset.json: exists and was not written by msattn"),
    Case("bench-json-is-a-folder", ("bench", "--json", f"{W}/out"), 2, "--json {w}/out: is a folder"),
    # --- issue 14: values that cannot be right
    Case("predict-scales-zero", (*PREDICT, f"{W}/out/p14", "--checkpoint", CKPT, "--scales", "0"), 2,
         "--scales: scales must lie in (0, 4], got 0"),
    Case("evaluate-scales-negative-and-repeated", (*EVAL, f"{W}/data/good", "--scales", "-0.5"), 2,
         "--scales: scales must lie in (0, 4], got -0.5"),
    Case("predict-scales-the-head-never-saw", (*PREDICT, f"{W}/out/p15", "--checkpoint", CKPT, "--scales", "1.0",
                                               "--scales", "0.75"),
         2, "--scales: this attention model was trained on 2 scales [1.0, 0.5]"),
    Case("checkpoint-classes-not-a-list", (*PREDICT, f"{W}/out/p16", "--checkpoint", f"{W}/ckpt/bad_classes.pt"), 2,
         "bad_classes.pt: malformed checkpoint: dataset.classes must be a list of class names"),
    Case("checkpoint-palette-wrong-shape", (*PREDICT, f"{W}/out/p17", "--checkpoint", f"{W}/ckpt/bad_palette.pt"), 2,
         "bad_palette.pt: malformed checkpoint: dataset.palette must be a list of [r, g, b] colours"),
    Case("evaluate-every-pixel-ignored", (*EVAL, f"{W}/data/all_ignored"), 2,
         "all_ignored/val.txt: every label pixel of the 2 image(s) is 255 (ignore): there is nothing to score"),
    Case("predict-images-dir-missing", ("predict", f"{W}/in/list.txt", "--images-dir", f"{W}/nowhere", "--checkpoint",
                                        CKPT, "--out", f"{W}/out/p18"),
         2, "--images-dir {w}/nowhere: folder not found"),
]

#: The cases issue 7 names; each must stay in the table.
ISSUE_CASES = {
    "truncated-jpeg-predict", "zero-byte-png-predict", "label-class-200-evaluate", "mat-without-anno",
    "coco-json-without-annotations", "list-file-with-dotdot", "recipe-unknown-key", "checkpoint-missing",
    "checkpoint-with-pickled-object",
}  # fmt: skip


def _oom(*args: object, **kwargs: object) -> None:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


PATCHES: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "no_pydensecrf": lambda mp: (mp.setitem(sys.modules, "pydensecrf", None),
                                 mp.setitem(sys.modules, "pydensecrf.densecrf", None)),
    "oom": lambda mp: mp.setattr(ScaleNet, "forward", _oom),
}


# ----------------------------------------------------------------------------- the world of bad files


class MkdirOnLoad:
    """Unpickling this runs ``os.mkdir(path)``: proof that a checkpoint's pickled code never ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _dataset_variants(data: Path) -> None:
    import shutil

    good = make_tiny_dataset(data / "good", num_train=2, num_val=2)
    for name in ("label200", "dotdot", "zero_label", "size_mismatch", "empty_list", "missing_image", "bad_json",
                 "all_ignored"):
        shutil.copytree(good, data / name)
    label = np.zeros((32, 32), dtype=np.uint8)
    label[5, 5] = 200
    Image.fromarray(label, mode="L").save(data / "label200" / "labels" / "val_000.png")
    Image.fromarray(label, mode="L").save(data / "label200" / "labels" / "train_000.png")
    (data / "dotdot" / "val.txt").write_text("val_000\n../x\n")
    (data / "zero_label" / "labels" / "val_000.png").write_bytes(b"")
    Image.fromarray(np.zeros((30, 32), dtype=np.uint8), mode="L").save(data / "size_mismatch" / "labels" / "val_000.png")
    (data / "empty_list" / "val.txt").write_text("# nothing here\n\n")
    (data / "missing_image" / "images" / "val_001.jpg").unlink()
    (data / "bad_json" / "dataset.json").write_text('{"name": "tiny", "classes": [')
    for item in ("val_000", "val_001"):
        Image.fromarray(np.full((32, 32), 255, np.uint8), mode="L").save(data / "all_ignored" / "labels" / f"{item}.png")
    shutil.copytree(good, data / "slash")
    (data / "slash" / "train.txt").write_text("train_000\nsub/train_000\n")


def _checkpoints(folder: Path, data_root: Path) -> None:
    torch.manual_seed(0)
    model = build_model(len(CLASSES), scales=(1.0, 0.5), width=0.0625)
    dataset = {"name": "tiny", "classes": CLASSES, "palette": PALETTE, "ignore_index": 255, "root": str(data_root),
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
    ok = make_checkpoint(model, dataset, config={})
    save_checkpoint(folder / "ok.pt", ok)
    torch.save({**ok, "extra": MkdirOnLoad(str(folder / "pwned"))}, folder / "pickled.pt")
    torch.save(model.state_dict(), folder / "other_tool.pt")
    save_checkpoint(folder / "newer.pt", {**ok, "format_version": 99})
    data = (folder / "ok.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    save_checkpoint(folder / "mismatch.pt", {**ok, "model_args": {**ok["model_args"], "num_classes": 5}})
    save_checkpoint(folder / "bad_classes.pt", {**ok, "dataset": {**dataset, "classes": "background"}})
    save_checkpoint(folder / "bad_palette.pt", {**ok, "dataset": {**dataset, "palette": [[0, 0], [128, 0]]}})


def _recipes(folder: Path, w: Path) -> None:
    folder.mkdir(parents=True)
    good = write_recipe(folder / "good.toml", w / "data" / "good", train={"iterations": 2, "batch_size": 2})
    text = good.read_text()
    (folder / "unknown_key.toml").write_text(text.replace("[optim]\n", "[optim]\nlearning_rate = 0.1\n"))
    (folder / "unknown_section.toml").write_text(text + "[optimiser]\nlr = 0.1\n")
    (folder / "wrong_type.toml").write_text(text.replace("lr = 0.01\n", 'lr = "fast"\n'))
    (folder / "int_for_bool.toml").write_text(text.replace("[data]\n", "[data]\nflip = 1\n"))
    (folder / "not_toml.toml").write_text("[data\nroot = 'x'\n")
    (folder / "bad_crf.toml").write_text("[crf]\nbi_w = -1.0\n")
    write_recipe(folder / "label200_worker.toml", w / "data" / "label200",  # the loader path: no pre-check
                 data={"workers": 1, "val_split": "none_such", "check": "off"}, train={"iterations": 2, "batch_size": 2})
    write_recipe(folder / "label200_check.toml", w / "data" / "label200",
                 data={"val_split": "none_such"}, train={"iterations": 2, "batch_size": 2})
    write_recipe(folder / "slash_split.toml", w / "data" / "slash", train={"iterations": 2, "batch_size": 2})
    write_recipe(folder / "no_data.toml", w / "data" / "nowhere", train={"iterations": 2, "batch_size": 2})


def _sources(src: Path) -> None:
    import scipy.io

    # Pascal-Part: a .mat without `anno`; a good .mat whose JPEG is truncated
    (src / "pp_noanno" / "Annotations_Part").mkdir(parents=True)
    (src / "pp_noanno" / "JPEGImages").mkdir()
    scipy.io.savemat(str(src / "pp_noanno" / "Annotations_Part" / "2008_000652.mat"), {"other": 1})
    h, w = 24, 20
    person = {"class": "person", "class_ind": 15, "mask": box(h, w, 2, 20, 4, 16),
              "parts": [("head", box(h, w, 2, 8, 6, 14))]}  # fmt: skip
    write_pascal_part_mat(src / "pp_trunc" / "Annotations_Part" / "2008_000652.mat", [person])
    jpg = src / "pp_trunc" / "JPEGImages" / "2008_000652.jpg"
    write_jpeg(jpg, pattern_image(h, w))
    jpg.write_bytes(jpg.read_bytes()[:200])
    # VOC: label with class 200; zero-byte label; a good pair (for the pixel limit)
    for name in ("voc_200", "voc_zero", "voc_ok"):
        write_jpeg(src / name / "JPEGImages" / "2007_000129.jpg", pattern_image(16, 20))
        label = np.zeros((16, 20), dtype=np.uint8)
        label[4:8, 4:8] = 200 if name == "voc_200" else 15
        png = src / name / "SegmentationClass" / "2007_000129.png"
        png.parent.mkdir(parents=True)
        if name == "voc_zero":
            png.write_bytes(b"")
        else:
            Image.fromarray(label, mode="L").save(png)
    # COCO: instances files without "annotations"; a file_name that climbs out of the image folder
    for split in ("train", "val"):
        folder = src / "coco_noann"
        (folder / f"{split}2014").mkdir(parents=True)
        (folder / "annotations").mkdir(exist_ok=True)
        (folder / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps({"images": [], "categories": [{"id": 1, "name": "person"}]})
        )
        images = coco_images(split, [1, 2])
        if split == "train":
            images[1]["file_name"] = "../outside.jpg"
        write_coco(src / "coco_dotdot", split, images, [], write_images=split == "val")
    write_jpeg(src / "coco_dotdot" / "outside.jpg", pattern_image(20, 24))


def _crf_inputs(folder: Path) -> None:
    (folder / "images").mkdir(parents=True)
    Image.fromarray(pattern_image(12, 16)).save(folder / "images" / "a.png")
    (folder / "probs_ok").mkdir()
    probs = np.full((3, 12, 16), 1 / 3, dtype=np.float16)
    np.savez_compressed(folder / "probs_ok" / "a.npz", probs=probs)
    (folder / "probs_bad").mkdir()
    (folder / "probs_bad" / "a.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("world")
    _dataset_variants(w / "data")
    (w / "ckpt").mkdir()
    _checkpoints(w / "ckpt", w / "data" / "good")
    _recipes(w / "recipes", w)
    _sources(w / "src")
    _crf_inputs(w / "crf")
    (w / "in").mkdir()
    write_jpeg(w / "in" / "good.jpg", pattern_image(40, 48))
    data = (w / "in" / "good.jpg").read_bytes()
    (w / "in" / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (w / "in" / "zero.png").write_bytes(b"")
    (w / "in" / "sub").mkdir()
    (w / "in" / "list.txt").write_text("# listed paths are relative to the list\nsub/../gone.jpg\n")
    (w / "runs").mkdir()
    (w / "out").mkdir()
    (w / "user_out").mkdir()
    (w / "user_out" / "good.png").write_bytes(b"a file of the user's, named like an output")
    return w


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Relative path -> (size, mtime) for files, None for folders: every path under ``root``."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
        for p in root.rglob("*")
    }


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("msattn: error:")]


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    if case.patch:
        PATCHES[case.patch](monkeypatch)
    before = snapshot(world)

    code, out, err = run_cli(*(arg.format(w=world) for arg in case.argv))

    after = snapshot(world)
    assert code == case.code, f"exit {code}, want {case.code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    message = case.message.format(w=world)
    if case.one_line:
        lines = error_lines(err)
        assert len(lines) == 1, f"want one 'msattn: error:' line, got {lines}\nstderr: {err}"
        assert message in lines[0], f"{message!r} not in {lines[0]!r}"
        assert err.rstrip().splitlines()[-1] == lines[0], "the error line must be the last thing printed"
    else:
        assert message in err, err
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in after if p not in before or after[p] != before[p])
    allowed = [pattern.format(w=world) for pattern in case.writes]
    unexpected = [p for p in changed if not any(fnmatch.fnmatchcase(p, a) for a in allowed)]
    assert not removed, f"deleted: {removed}"
    assert not unexpected, f"written although the command failed: {unexpected}"
    assert not [p for p in after if Path(p).name.startswith(".tmp-")], "temporary file left behind"


def test_table_covers_the_issue_cases() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert ISSUE_CASES <= set(ids), ISSUE_CASES - set(ids)
    assert {c.code for c in CASES} == {1, 2}


def test_pickled_payload_is_live_but_never_runs(world: Path) -> None:
    """The pickled checkpoint really carries code (it runs under weights_only=False): the table shows msattn refuses it."""
    marker = world / "ckpt" / "pwned"
    assert not marker.exists()
    torch.load(world / "ckpt" / "pickled.pt", weights_only=False)
    assert marker.is_dir()
    marker.rmdir()


# ----------------------------------------------------------------------------- --debug, separate processes


def test_debug_shows_the_traceback_and_does_not_leak(world: Path, run_cli) -> None:
    from msattn.errors import CheckpointError

    argv = ["--debug", "predict", str(world / "in" / "good.jpg"), "--checkpoint", str(world / "ckpt" / "nowhere.pt"),
            "--out", str(world / "out" / "debug")]  # fmt: skip
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        main(argv)
    assert "MSATTN_DEBUG" not in os.environ  # the next in-process call reports, not raises
    code, _, err = run_cli(*argv[1:])
    assert code == 2 and error_lines(err) and "Traceback" not in err


def _python_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "msattn.cli", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )  # fmt: skip


def test_separate_process_one_line_and_debug_traceback(world: Path) -> None:
    args = ("prepare-data", "coco", "--coco", world / "src" / "coco_noann", "--out", world / "out" / "sub")
    plain = _python_cli(*args)
    assert plain.returncode == 2
    assert plain.stderr.splitlines() == [
        f"msattn: error: {world}/src/coco_noann/annotations/instances_train2014.json: not a COCO instances file "
        "(needs lists 'images', 'annotations', 'categories')"
    ]
    debug = _python_cli("--debug", *args)
    assert debug.returncode == 1  # an uncaught exception
    assert "Traceback (most recent call last)" in debug.stderr and "msattn.errors.DataError" in debug.stderr
    assert not (world / "out" / "sub").exists()


# ----------------------------------------------------------------------------- resources beyond the table


def test_predict_falls_back_to_one_image_at_a_time_on_gpu_oom(world: Path, run_cli, monkeypatch) -> None:
    """Out of GPU memory on a batch of 2: each image is retried alone, and all are written."""
    real = ScaleNet.forward
    batches: list[int] = []

    def forward(self, images, scales=None):
        batches.append(images.shape[0])
        if images.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(self, images, scales)

    monkeypatch.setattr(ScaleNet, "forward", forward)
    folder = world / "in_pair"
    for i in range(2):
        write_jpeg(folder / f"im{i}.jpg", pattern_image(24, 28, seed=i))
    code, _, err = run_cli("predict", folder, "--checkpoint", world / "ckpt" / "ok.pt", "--out", world / "out" / "pair",
                           "--batch-size", "2", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert batches == [2, 1, 1]
    assert sorted(p.name for p in (world / "out" / "pair").iterdir() if not p.name.startswith(".msattn")) == [
        "im0.png", "im0_overlay.jpg", "im1.png", "im1_overlay.jpg"
    ]


def test_training_runs_without_tensorboard(world: Path, run_cli, monkeypatch) -> None:
    """tensorboard is optional: without it training still writes metrics.jsonl and checkpoints."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code, _, err = run_cli("train", world / "recipes" / "good.toml", "--device", "cpu", "--out", world / "runs" / "notb")
    assert code == 0, err
    run = world / "runs" / "notb"
    assert (run / "last.pt").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2
    assert not (run / "tensorboard").exists()
