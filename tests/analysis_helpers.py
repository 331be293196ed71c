"""A stub two-scale model and a hand-made dataset whose analysis results are known exactly.

Images are 33x33 (a grid side: no padding). Channel 0 holds the true class, channel 1 says
which scale is right on that object (1: scale 2, 0: scale 1). The stub's maps live at full
resolution, so no resizing touches them:

- scale 2 scores 10 for the true class where channel 1 is 1 (and on background), else 10 for a wrong class;
- scale 1 scores 8 for the true class where channel 1 is 0 (and on background), else 8 for a wrong class;
- attention weight of scale 2: 0.9 where channel 1 is 1, 0.1 where it is 0, 0.5 on background.

So attention and the oracle are right everywhere; max and avg merging follow scale 2 (its
scores are larger); each object's weights are 0.9/0.1 or 0.1/0.9.
"""

from __future__ import annotations

import torch

SIDE = 33
CLASSES = ["background", "red", "green"]
#: (top, left, side, class, scale-2 right) per object and image; sizes: 2x2 = 0.37% (<0.5%),
#: 6x6 = 3.3% (2-8%), 20x20 = 36.7% (>=32%) of the 1089-pixel image
LAYOUTS = [
    [(0, 0, 2, 1, 1), (5, 5, 2, 2, 1), (10, 10, 20, 1, 0)],
    [(0, 0, 6, 2, 1), (0, 20, 6, 1, 0), (30, 30, 2, 1, 1)],
    [(10, 0, 20, 2, 0), (0, 25, 6, 2, 1), (31, 24, 2, 2, 1)],
    [(0, 0, 6, 1, 0), (20, 20, 2, 2, 1), (25, 25, 6, 1, 1)],
]


def make_items() -> list[dict]:
    """The hand-made images: ``{"image": float[3, 33, 33], "label": int64[33, 33], "id": str}``."""
    items = []
    for n, layout in enumerate(LAYOUTS):
        image = torch.zeros(3, SIDE, SIDE)
        label = torch.zeros(SIDE, SIDE, dtype=torch.int64)
        for top, left, side, cls, right2 in layout:
            image[0, top : top + side, left : left + side] = cls
            image[1, top : top + side, left : left + side] = right2
            label[top : top + side, left : left + side] = cls
        label[SIDE - 1, SIDE - 3 :] = 255  # a few ignored pixels
        items.append({"image": image, "label": label, "id": f"img{n}"})
    return items


def expected_counts() -> dict[str, int]:
    """Pixels of background (scored), of objects scale 2 gets right, of objects scale 1 gets right."""
    counts = {"background": 0, "right2": 0, "right1": 0}
    for item in make_items():
        label, flag = item["label"], item["image"][1]
        counts["background"] += int((label == 0).sum())
        counts["right2"] += int(((label > 0) & (label < 255) & (flag == 1)).sum())
        counts["right1"] += int(((label > 0) & (label < 255) & (flag == 0)).sum())
    return counts


class StubScaleModel(torch.nn.Module):
    """Implements ScaleNet's forward contract with maps built from the image channels (see the module doc)."""

    def __init__(self, merge: str = "attention") -> None:
        super().__init__()
        self.scales = (2.0, 1.0)
        self.merge = merge
        self.num_classes = len(CLASSES)
        self.calls = 0

    def forward(self, images: torch.Tensor, scales=None) -> dict:
        self.calls += 1
        c = self.num_classes
        truth = images[:, 0].round().long().clamp(0, c - 1)  # [N, H, W]
        right2 = images[:, 1] > 0.5
        background = truth == 0
        wrong = truth % (c - 1) + 1  # another foreground class
        wrong = torch.where(wrong == truth, (truth + 1) % c, wrong)
        pick2 = torch.where(right2 | background, truth, wrong)
        pick1 = torch.where(~right2 | background, truth, wrong)
        f2 = 10.0 * torch.nn.functional.one_hot(pick2, c).permute(0, 3, 1, 2).float()
        f1 = 8.0 * torch.nn.functional.one_hot(pick1, c).permute(0, 3, 1, 2).float()
        w2 = torch.where(background, 0.5, torch.where(right2, 0.9, 0.1))
        weights = torch.stack([w2, 1 - w2], dim=1)  # [N, 2, H, W]
        if self.merge == "attention":
            out = weights[:, :1] * f2 + weights[:, 1:] * f1
        elif self.merge == "max":
            out = torch.maximum(f2, f1)
        else:
            out = (f2 + f1) / 2
        return {"out": out, "per_scale": [f2, f1], "attention": weights, "scales": self.scales}


#: ScaleNet arguments of the same shape of network: FLOPs are counted on it (meta device)
STUB_MODEL_ARGS = {"num_classes": 3, "scales": [2.0, 1.0], "merge": "attention", "width": 0.0625, "dropout": 0.0,
                   "attention_dropout": 0.0}


__all__ = ["CLASSES", "STUB_MODEL_ARGS", "StubScaleModel", "expected_counts", "make_items"]
