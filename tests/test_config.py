"""Recipes: every shipped recipe validates; bad keys, types and overrides fail naming key and file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msattn.config.crf import CRFParams
from msattn.config.recipe import (
    Recipe,
    apply_overrides,
    format_recipe,
    load_recipe,
    parse_override,
    read_toml,
    recipe_from_dict,
    recipe_to_dict,
)
from msattn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {"voc.toml", "person_part.toml", "coco.toml", "demo.toml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert isinstance(recipe.crf, CRFParams)
    assert recipe_from_dict(recipe_to_dict(recipe), source="copy") == recipe
    # the printed form is valid TOML that loads back to the same recipe
    printed = write_recipe_text(path.parent, format_recipe(recipe))
    assert load_recipe(printed) == recipe
    printed.unlink()


def write_recipe_text(folder: Path, text: str) -> Path:
    import tempfile

    handle = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, dir=tempfile.gettempdir())
    handle.write(text)
    handle.close()
    return Path(handle.name)


def test_voc_recipe_is_the_papers_best_model() -> None:
    r = load_recipe(ROOT / "recipes" / "voc.toml")
    assert r.model.scales == (1.0, 0.75, 0.5)
    assert r.model.merge == "attention" and r.model.extra_supervision
    assert r.model.pretrained == "torchvision"
    assert r.train.batch_size == 30 and r.train.batch_size % r.micro_batch == 0
    assert (r.optim.lr, r.optim.head_lr_mult, r.optim.momentum, r.optim.weight_decay) == (1e-3, 10.0, 0.9, 5e-4)
    assert (r.optim.schedule, r.optim.step_size, r.optim.gamma, r.train.iterations) == ("step", 2000, 0.1, 6000)
    assert r.data.crop_size == 321 and r.data.train_split == "train"
    assert r.model.attention_dropout == 0.5 and r.optim.attention_lr_mult == 10.0


@pytest.mark.parametrize("name", ["voc.toml", "person_part.toml", "coco.toml", "voc-hier.toml", "cityscapes-hier.toml"])
def test_paper_recipes_read_the_lists_prepare_data_writes(name: str) -> None:
    from msattn.data.prepare.common import SPLITS

    r = load_recipe(ROOT / "recipes" / name)
    assert r.data.train_split in SPLITS and r.data.val_split in SPLITS, (r.data.train_split, r.data.val_split)
    assert r.data.select_split is None and r.model.input_norm == "auto"


def test_hierarchical_recipes_are_their_models_recipes_with_the_merge_changed() -> None:
    """voc-hier and demo-scales-hier differ from voc and demo-scales only where their comments say."""
    for plain, hier, changed in (
        ("voc.toml", "voc-hier.toml", {"model.scales", "model.merge", "model.extra_supervision_weight", "eval.scales"}),
        ("demo-scales.toml", "demo-scales-hier.toml", {"model.merge", "eval.scales"}),
    ):
        a, b = (recipe_to_dict(load_recipe(ROOT / "recipes" / name)) for name in (plain, hier))
        differ = {f"{section}.{key}" for section in a for key in a[section] if a[section][key] != b[section][key]}
        differ -= {"model.attention_dropout"}  # an option of the softmax head only
        assert differ == changed, (hier, differ)
    voc = load_recipe(ROOT / "recipes" / "voc-hier.toml")  # the hierarchical paper's pair, predicted on 3 scales
    assert voc.model.merge == "hierarchical" and voc.model.scales == (1.0, 0.5) and voc.eval.scales == (2.0, 1.0, 0.5)
    demo = load_recipe(ROOT / "recipes" / "demo-scales-hier.toml")  # the demo's pair (measured: docs/)
    assert demo.model.merge == "hierarchical" and demo.model.scales == demo.eval.scales == (2.0, 1.0)


def test_the_cityscapes_recipe_takes_nvidias_settings() -> None:
    r = load_recipe(ROOT / "recipes" / "cityscapes-hier.toml")
    assert (r.model.merge, r.model.scales, r.eval.scales) == ("hierarchical", (1.0, 0.5), (0.5, 1.0, 2.0))
    assert r.model.extra_supervision and r.model.extra_supervision_weight == 0.05
    assert (r.model.backbone, r.model.batchnorm, r.data.scale_range) == ("resnet101", "sync", (0.5, 2.0))
    assert (r.optim.optimizer, r.optim.lr, r.optim.momentum, r.optim.weight_decay) == ("sgd", 5e-3, 0.9, 1e-4)
    assert (r.optim.schedule, r.optim.power, r.optim.head_lr_mult, r.optim.attention_lr_mult) == ("poly", 2.0, 1, 1)
    assert r.train.batch_size == 8 and r.train.iterations == 65_100  # 175 epochs of 2,975 images
    assert r.train.label_mode == "upsample"
#: the DeepLab-v2 ResNet-101 recipes (issue #23) and their iterations
DEEPLAB_V2_RECIPES = {"voc-resnet101.toml": 20_000, "cocostuff164k-resnet101.toml": 100_000}


@pytest.mark.parametrize("name", sorted(DEEPLAB_V2_RECIPES))
def test_deeplab_v2_recipes_are_msc_on_resnet101_and_read_the_lists_prepare_data_writes(name: str) -> None:
    """DeepLab-v2's MSC: ResNet-101 + ASPP-L, scales 1 / 0.75 / 0.5, max, per-scale losses, poly 2.5e-4, batch 10."""
    from msattn.data.prepare.common import SPLITS

    r = load_recipe(ROOT / "recipes" / name)
    assert (r.model.backbone, r.model.head, r.model.aspp_dilations, r.model.batchnorm) == (
        "resnet101", "aspp", (6, 12, 18, 24), "frozen")  # fmt: skip
    assert r.model.scales == (1.0, 0.75, 0.5) and r.model.merge == "max" and r.model.extra_supervision
    assert (r.optim.optimizer, r.optim.lr, r.optim.schedule, r.optim.power) == ("sgd", 2.5e-4, "poly", 0.9)
    assert (r.optim.momentum, r.optim.weight_decay, r.optim.head_lr_mult) == (0.9, 5e-4, 10.0)
    assert r.train.batch_size == 10 and r.train.iterations == DEEPLAB_V2_RECIPES[name]
    assert r.data.crop_size == 321 and r.data.scale_range == (0.5, 1.5) and r.eval.pad_to == 513
    assert r.data.train_split in SPLITS and r.data.val_split in SPLITS and r.model.input_norm == "auto"
    assert load_recipe(ROOT / "recipes" / name, ["model.merge=attention"]).model.merge == "attention"


def test_the_lite0_demo_starts_from_the_packaged_imagenet_weights() -> None:
    r = load_recipe(ROOT / "recipes" / "demo-lite0.toml")
    assert (r.model.backbone, r.model.pretrained, r.model.width) == ("efficientnet_lite0", "efficientnet_lite0", 1.0)
    assert r.data.auto_prepare == "demo-silhouettes" and r.model.input_norm == "auto"
    scratch = load_recipe(ROOT / "recipes" / "demo-lite0.toml", ["model.pretrained=none", "model.batchnorm=train"])
    assert scratch.model.pretrained is None and scratch.model.batchnorm == "train"


def test_cocostuff_labels_import_with_prepare_data_masks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """COCO-Stuff's PNG label maps (value = id - 1, 255 unlabeled) through the recipe's class table: 171 classes,
    the 11 ids COCO never annotates ignored, split folders linked as train/ and val/ (the recipe's comment)."""
    import json
    import os

    import numpy as np
    from _data_helpers import run_cli
    from _import_helpers import read_label, write_image
    from PIL import Image

    coco = tmp_path / "coco"
    values = np.array([[0, 91, 181, 255], [11, 182 - 1, 0, 90]], dtype=np.uint8).repeat(3, 0).repeat(3, 1)
    for split in ("train2017", "val2017"):
        write_image(coco / split / "000000000009.jpg", *values.shape)
        (coco / "stuffthingmaps_trainval2017" / split).mkdir(parents=True)
        Image.fromarray(values).save(coco / "stuffthingmaps_trainval2017" / split / "000000000009.png")
    for kind, source in (("images", coco), ("masks", coco / "stuffthingmaps_trainval2017")):
        (tmp_path / "cocostuff" / kind).mkdir(parents=True)
        for split in ("train", "val"):
            os.symlink(source / f"{split}2017", tmp_path / "cocostuff" / kind / split)
    out = tmp_path / "data"
    code, _, err = run_cli(capsys, "prepare-data", "masks", "--images", tmp_path / "cocostuff" / "images", "--masks",
                           tmp_path / "cocostuff" / "masks", "--classes", ROOT / "recipes" / "cocostuff164k-classes.json",
                           "--out", out, "-j", "0")  # fmt: skip
    assert code == 0, err
    info = json.loads((out / "dataset.json").read_text())
    assert len(info["classes"]) == 171 and info["classes"][0] == "person" and info["classes"][-1] == "wood"
    assert info["classes"][91 - 11] == "banner"  # id 92 (value 91), after the 11 unused thing ids below it
    label = read_label(out / "labels" / "000000000009.png")
    expected = np.array([[0, 80, 170, 255], [255, 170, 0, 255]]).repeat(3, 0).repeat(3, 1)  # 11, 90: never annotated
    assert np.array_equal(label, expected)
    recipe = load_recipe(ROOT / "recipes" / "cocostuff164k-resnet101.toml", [f"data.root={json.dumps(str(out))}"])
    assert all((out / f"{split}.txt").is_file() for split in (recipe.data.train_split, recipe.data.val_split))


def matrix_rows() -> list[list[str]]:
    """The `--set` overrides of every table row in recipes/README.md."""
    rows = []
    text = (ROOT / "recipes" / "README.md").read_text()
    section = text.split("## Tables 1, 3, 5, 6 and 7", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if line.startswith("| ") and ("`model." in line or "(none)" in line):
            rows.append(re.findall(r"`([a-z_]+\.[a-z_]+=[^`]*)`", line))
    return rows


def test_readme_matrix_covers_the_paper_rows_and_every_row_loads() -> None:
    rows = matrix_rows()
    assert len(rows) == 13  # baseline + 2 scale sets x 3 merges x (with, without E-Supv)
    seen = set()
    for overrides in rows:
        for name in ("voc", "person_part", "coco", "voc-from-coco"):
            r = load_recipe(ROOT / "recipes" / f"{name}.toml", overrides)
            seen.add((r.model.scales, r.model.merge if len(r.model.scales) > 1 else "-", r.model.extra_supervision
                      if len(r.model.scales) > 1 else "-"))
    assert len(seen) == 13


def test_readme_matrix_gives_the_paper_number_of_every_column() -> None:
    text = (ROOT / "recipes" / "README.md").read_text()
    section = text.split("## Tables 1, 3, 5, 6 and 7", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and ("`model." in line or "(none)" in line)]
    for line in rows:
        cells = [c.strip(" *") for c in line.strip("|").split("|")][2:]
        assert len(cells) == 5 and all(re.fullmatch(r"\d\d\.\d\d", c) for c in cells), line


def test_readme_table4_rows_load_on_the_test_recipe() -> None:
    text = (ROOT / "recipes" / "README.md").read_text()
    section = text.split("**Table 4 (VOC 2012 test).**", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in section.splitlines() if line.startswith("| DeepLab")]
    assert len(rows) == 5
    seen = set()
    for line in rows:
        overrides = [o.replace("<COCO-pretrained run>", "runs/coco") for o in re.findall(r"--set ([^ `]+)", line)]
        r = load_recipe(ROOT / "recipes" / "voc-test.toml", overrides)
        seen.add((r.model.merge, r.data.scale_range, r.model.init_from))
    assert len(seen) == 5


def test_overrides_parse_as_toml_or_bare_strings(tmp_path: Path) -> None:
    path = write(tmp_path, '[data]\nroot = "d"\n')
    r = load_recipe(path, ["model.scales=[1, 0.5]", "model.merge=max", "optim.lr=0.02", "train.amp=off",
                           "model.extra_supervision=false", "data.scale_range=[0.5, 1.5]", "model.pretrained=none",
                           'data.root="other dir"', "crf.iterations=3"])
    assert r.model.scales == (1.0, 0.5) and r.model.merge == "max" and r.optim.lr == 0.02
    assert r.train.amp == "off" and r.model.extra_supervision is False
    assert r.data.scale_range == (0.5, 1.5) and r.model.pretrained is None
    assert r.data.root == "other dir" and r.crf.iterations == 3
    assert parse_override("a.b=x = 1") == ("a", "b", "x = 1")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.scalez=[1]", "unknown key model.scalez (did you mean scales?)"),
        ("modle.scales=[1]", "unknown section modle"),
        ("model.width=true", "model.width must be a number"),
        ("train.iterations=1.5", "train.iterations must be an integer"),
        ("train.iterations=0", "train.iterations must be >= 1"),
        ("model.merge=sum", "model.merge must be one of"),
        ("model.scales=[]", "model.scales needs at least one value"),
        ("model.scales=[1, 1.0]", "distinct"),
        ("optim.lr=nan", "optim.lr must be a finite number"),
        ("crf.bi_w=-1", "crf.bi_w must be a positive number"),
        ("noequals", "expected section.key=value"),
        ("a.b.c=1", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_override(tmp_path: Path, override: str, message: str) -> None:
    path = write(tmp_path, '[data]\nroot = "d"\n[train]\nbatch_size = 10\nmicro_batch = 5\n')
    with pytest.raises(ConfigError) as info:
        load_recipe(path, [override])
    assert message in str(info.value)
    assert f"--set {override}" in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[data]\nroot = "d"\n[model]\nscalez = [1.0]\n', "unknown key model.scalez"),
        ('[data]\nroot = "d"\n[modle]\n', "unknown section [modle]"),
        ('[data]\nroot = "d"\ncrop_size = true\n', "data.crop_size must be an integer, got a boolean"),
        ('[data]\nroot = "d"\nflip = 1\n', "data.flip must be true or false"),
        ('[data]\nroot = "d"\nmean = [0.5, 0.5]\n', "data.mean needs exactly 3 values"),
        ('[data]\nroot = "d"\nscale_range = [1.4, 0.6]\n', "lo <= hi"),
        ('[data]\nroot = "d"\n[optim]\nlr = 1e400\n', "optim.lr must be a finite number"),
        ('[data]\nroot = "d"\n[optim]\nlr = 1' + "0" * 50 + "\n", "optim.lr must be <="),
        ('[data]\nroot = "d"\n[train]\nseed = -1\n', "train.seed must be >= 0"),
        ('[data]\nroot = "d"\n[eval]\nscales = [1.0, 0.5]\n', "eval.scales must have as many scales"),
        ('[data]\nroot = "d"\n[model]\nscales = [1.0, 0.5]\n[eval]\nscales = [1.0, 0.75]\n', "and the same ones"),
        ('[data]\nroot = "d"\n[model]\npretrained = "torchvision"\ninit_checkpoint = "x.pt"\n', "not both"),
        ('[model]\nwidth = 0.5\n', "missing section [data]"),
        ('[data]\ncrop_size = 33\n', "missing key data.root"),
        ('[data]\nroot = "d"\ncrop_size = 320\n', "data.crop_size must be 8k+1 pixels"),
        ('[data]\nroot = "d"\nselect_split = "val"\n', "held-out"),
        ('[data]\nroot = "d"\n[eval]\npad_to = 512\n', "eval.pad_to must be 8k+1"),
        ('data = 3\n', "[data] must be a table"),
        ("[data\n", "not valid TOML"),
    ],
)
def test_bad_recipes_name_the_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


HIERARCHICAL = '[data]\nroot = "d"\n[model]\nmerge = "hierarchical"\n'
TWO = HIERARCHICAL + "scales = [1.0, 0.5]\n"


@pytest.mark.parametrize(
    ("text", "message", "key"),
    [
        (HIERARCHICAL, "model.scales: a hierarchical model trains on exactly two scales, one of them 1.0", ""),
        (HIERARCHICAL + "scales = [0.75, 0.5]\n", "exactly two scales, one of them 1.0 (e.g. [1.0, 0.5])", ""),
        (HIERARCHICAL + "scales = [1.0]\n", "got [1.0]", ""),
        (TWO + "[eval]\nscales = [2.0, 0.5]\n", "eval.scales: a hierarchical model needs scale 1.0", ""),
        (TWO + 'attention_init = "zero"\n', "model.attention_init is an option of the softmax", ""),
        (TWO, "model.scales: a hierarchical model trains on exactly two", "--set model.scales=[1, 0.75, 0.5]"),
        (TWO, "eval.scales: a hierarchical model needs scale 1.0", "--set eval.scales=[0.5]"),
    ],
)
def test_hierarchical_recipes_are_checked(tmp_path: Path, text: str, message: str, key: str) -> None:
    path = write(tmp_path, text)
    overrides = [key.removeprefix("--set ")] if key else []
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    assert message in str(info.value)
    assert (key or str(path)) in str(info.value)


def test_hierarchical_models_take_any_eval_scales_with_one(tmp_path: Path) -> None:
    path = write(tmp_path, HIERARCHICAL + "scales = [1.0, 0.5]\n[eval]\nscales = [0.5, 1.0, 2.0]\n")
    r = load_recipe(path)
    assert r.model.merge == "hierarchical" and r.eval.scales == (0.5, 1.0, 2.0)
    assert load_recipe(path, ["model.scales=[2.0, 1.0]", "eval.scales=[1.0]"]).model.scales == (2.0, 1.0)
    with pytest.raises(ConfigError, match="and the same ones"):  # the softmax head keeps its check
        load_recipe(path, ["model.merge=attention"])


def test_types_are_strict_but_ints_are_numbers(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, '[data]\nroot = "d"\nscale_range = [1, 2]\n[optim]\nlr = 1\n'))
    assert r.optim.lr == 1.0 and isinstance(r.optim.lr, float)
    assert r.data.scale_range == (1.0, 2.0)
    assert r.model.num_classes is None and r.train.micro_batch is None and r.micro_batch == 30


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe not found"):
        read_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe[data]")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(bad)
    with pytest.raises(ConfigError, match="is a folder"):
        read_toml(tmp_path)


def test_apply_overrides_creates_missing_sections() -> None:
    values: dict = {"data": {"root": "x"}}
    origins = apply_overrides(values, ["eval.flip=true"])
    assert values["eval"] == {"flip": True}
    assert origins == {"eval.flip": "--set eval.flip=true"}


def test_cli_dry_run_reports_bad_key_with_exit_2(run_cli, tmp_path: Path) -> None:
    path = write(tmp_path, '[data]\nroot = "d"\n[train]\niteratons = 5\n')
    code, out, err = run_cli("train", path, "--dry-run")
    assert code == 2
    assert "unknown key train.iteratons" in err and str(path) in err
    assert "Traceback" not in err


def test_cli_dry_run_prints_config_and_warns_about_missing_data(run_cli, tmp_path: Path) -> None:
    path = write(tmp_path, f'[data]\nroot = "{tmp_path / "nodata"}"\n')
    code, out, err = run_cli("train", path, "--dry-run", "--out", tmp_path / "run", "--set", "model.merge=max")
    assert code == 0, err
    assert "[model]" in out and 'merge = "max"' in out and "recipe OK" in err
    assert "batch 30 over 1 process, 1 micro-batch: 30 images" in err
    assert "warning" in err and "nodata" in err
    assert not (tmp_path / "run").exists()


# A TOML document is a tree of tables, arrays and scalars: any of them must load or raise ConfigError.
scalars = st.one_of(
    st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8),
    st.sampled_from(["none", "max", "poly", "torchvision", "demo", ""]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
keys = st.sampled_from(
    ["root", "crop_size", "scales", "merge", "width", "lr", "iterations", "batch_size", "micro_batch", "scale_range",
     "mean", "bi_w", "iterations", "flip", "limit", "pretrained", "schedule", "amp", "unknown"]
)
sections = st.sampled_from(["data", "model", "optim", "train", "eval", "crf", "other"])
documents = st.dictionaries(sections, st.one_of(st.dictionaries(keys, values, max_size=4), scalars), max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_document_gives_a_recipe_or_config_error(doc: dict) -> None:
    try:
        recipe = recipe_from_dict(doc, source="doc.toml")
    except ConfigError as exc:
        assert str(exc).startswith("doc.toml") or str(exc).startswith("--set")
    else:
        assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
