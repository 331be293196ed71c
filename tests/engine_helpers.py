"""Helpers for the engine tests: tiny dataset folders and tiny recipes (imported by test_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["background", "red", "green"]
COLOURS = {1: (220, 40, 40), 2: (40, 200, 60)}
PALETTE = [[0, 0, 0], [128, 0, 0], [0, 128, 0]]


def make_tiny_dataset(root: Path, num_train: int = 8, num_val: int = 4, size: int = 32, seed: int = 0) -> Path:
    """A 3-class dataset folder: coloured rectangles (red = 1, green = 2) on a noisy grey background."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for split, count in (("train", num_train), ("val", num_val)):
        for i in range(count):
            item_id = f"{split}_{i:03d}"
            image = rng.normal(120, 20, (size, size, 3))
            label = np.zeros((size, size), dtype=np.uint8)
            for cls in (1, 2):
                h, w = rng.integers(size // 4, size // 2, 2)
                top, left = rng.integers(0, size - h), rng.integers(0, size - w)
                image[top : top + h, left : left + w] = COLOURS[cls]
                label[top : top + h, left : left + w] = cls
            label[0, :3] = 255  # a few ignored pixels
            rgb = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
            rgb.save(root / "images" / f"{item_id}.jpg", quality=95)
            png = Image.fromarray(label, mode="L")
            png.putpalette([v for rgb in PALETTE for v in rgb] + [0] * (768 - 9))
            png.save(root / "labels" / f"{item_id}.png")
            splits[split].append(item_id)
    for split, ids in splits.items():
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    info = {"name": "tiny", "classes": CLASSES, "ignore_index": 255, "palette": PALETTE}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def write_recipe(path: Path, data_root: Path, **sections: dict) -> Path:
    """A tiny CPU recipe (width 1/16, crop 32, dropout 0, a few iterations); ``sections`` override keys."""
    values: dict[str, dict] = {
        "data": {"root": str(data_root), "crop_size": 33, "workers": 0, "scale_range": "none"},
        "model": {"scales": [1.0, 0.5], "merge": "attention", "width": 0.0625, "dropout": 0.0,
                  "attention_dropout": 0.0},
        "optim": {"lr": 0.01, "schedule": "poly"},
        "train": {"iterations": 6, "batch_size": 4, "micro_batch": 2, "log_every": 1, "val_every": 0,
                  "checkpoint_every": 0, "seed": 0},
        "eval": {"batch_size": 2},
    }
    for name, table in sections.items():
        values.setdefault(name, {}).update(table)
    lines = []
    for name, table in values.items():
        lines.append(f"[{name}]")
        for key, value in table.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_checkpoint(path: Path, data_root: Path | str = "", scales: tuple = (1.0, 0.5), merge: str = "attention",
                         **dataset: object) -> Path:
    """An untrained width-1/16 checkpoint of the tiny dataset's classes (seeded), written to ``path``."""
    import torch

    from msattn.models.scale import build_model
    from msattn.runtime.checkpoint import make_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = build_model(len(CLASSES), scales=scales, merge=merge, width=0.0625)
    meta = {"name": "tiny", "classes": CLASSES, "palette": PALETTE, "ignore_index": 255, "root": str(data_root),
            **dataset}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, make_checkpoint(model, meta, config={}, iteration=0))
    return path
