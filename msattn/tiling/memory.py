"""Memory budgets and the estimate that decides whether an image is predicted whole or in tiles.

**The estimate** (bytes for one forward pass of an ``H x W`` image, padded to 8k+1 sides,
area ``A``), measured on CPU in fp32 with ``msattn bench``'s peak-RSS probe and rounded up:

- network activations: ``B * width`` bytes per pixel of the largest scale (``A * max(scales)^2``),
  ``B`` per backbone, for one scale and for several (:data:`ACTIVATION_BYTES`). VGG-16: the
  first block dominates (two 64-channel maps at full resolution plus the convolution's working
  copy), ``B = 700`` (measured 406 for one scale and 690 for three-scale attention at width 1,
  513x513). The other backbones: the same probe (peak RSS growth of one forward after a
  warm-up, width 1, 21 classes, 513 and 769 pixels, one scale and {1, 0.75, 0.5} attention,
  torch 2.13 CPU, 2026-12), the larger of the two sizes, rounded up to 100. ResNet-50: 921 /
  1004 one scale, 1673 / 1676 three; ResNet-101: 1023 / 956 and 2002 / 1473; Lite0: 760 / 382
  and 2042 / 933 (its maps are small, its peak is mostly the attention head on 3 x 1280
  channels and fixed buffers, hence the drop at 769). The same run gave VGG-16 768 / 768 and
  1026 / 768: its older figure is kept. A ``timm:`` backbone is unknown to the table and gets
  the largest figures;
- the output stage: merged logits upsampled to the image, their softmax and the merge weights
  at image size, ``16 * C + 12 * S + 32`` bytes per pixel (measured 290-340 for C = 21, S = 3);
- the peak is the larger of the two, plus ``24`` bytes per pixel for the normalised and padded
  input, plus a fixed ``2 x`` the weights (oneDNN keeps reordered copies of them).

**A tiled image** needs the estimate for one tile, the tile's weighted outputs
(``4 * (C + S)`` bytes per tile pixel), twice the stitcher's band (``4 * (C + S + 1)`` bytes
per pixel of a tile-high strip of the image; moving the band copies its overlapping rows)
and the image itself (3 bytes per pixel, plus 1 for the labels). Measured on CPU for a
4000x3000 image, 21 classes, 3 scales with attention (``msattn bench --mode tiled``): width
0.25 in 1025-pixel tiles 1098 MB (estimated 1369), whole 3380 MB (4918); width 1 in tiles
1379 MB (1914), whole 6270 MB (8555). :func:`choose_tile` takes the largest tile that fits.

**The budget** (``--max-memory``, e.g. ``4GB``, ``512MiB``): by default 80% of the free memory
of the CUDA device, or 50% of the available RAM on CPU (``MemAvailable``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from msattn.errors import ResourceError
from msattn.geometry import STRIDE, padded_size
from msattn.sizes import format_bytes
from msattn.tiling.layout import MIN_TILE, Tiling, default_overlap, scale_quantum

GPU_SHARE = 0.8
CPU_SHARE = 0.5


def available_ram() -> int | None:
    """Available RAM in bytes (Linux MemAvailable; else free pages), or None when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget(device: str = "cpu") -> int:
    """80% of the CUDA device's free memory, or 50% of the available RAM (8 GiB when unknown)."""
    if str(device).startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free * GPU_SHARE)
    ram = available_ram()
    return int((ram if ram is not None else 16 * 2**30) * CPU_SHARE)


#: activation bytes per pixel of the largest scale at width 1, per backbone: (one scale, several scales)
ACTIVATION_BYTES: dict[str, tuple[float, float]] = {
    "vgg16_largefov": (700.0, 700.0),
    "resnet50": (1100.0, 1700.0),
    "resnet101": (1100.0, 2100.0),
    "efficientnet_lite0": (800.0, 2100.0),
}
#: a backbone the table does not know (``timm:<name>``): the largest figures
UNKNOWN_BACKBONE_BYTES = (max(v[0] for v in ACTIVATION_BYTES.values()), max(v[1] for v in ACTIVATION_BYTES.values()))


def activation_bytes(backbone: str, num_scales: int = 1) -> float:
    """Activation bytes per pixel at width 1 of ``backbone`` (:data:`ACTIVATION_BYTES`, else the largest)."""
    single, several = ACTIVATION_BYTES.get(backbone, UNKNOWN_BACKBONE_BYTES)
    return single if num_scales == 1 else several


@dataclass(frozen=True)
class MemoryModel:
    """What the estimate needs to know about a model (from a checkpoint or an ONNX file's metadata).

    ``stride`` is the model's output stride (8 for every backbone msattn builds: tiles are
    ``8k + 1`` pixels and start on multiples of it); ``grid_exact`` is False for a timm model
    whose outputs do not sit on the 8k+1 grid (tiles are then blended approximately).
    """

    width: float
    num_classes: int
    scales: tuple[float, ...]
    weight_bytes: int = 0
    backbone: str = "vgg16_largefov"
    stride: int = STRIDE
    grid_exact: bool = True

    def bytes_per_pixel(self) -> float:
        """Peak bytes per (padded) image pixel of one forward pass (see the module docstring)."""
        activations = activation_bytes(self.backbone, len(self.scales)) * self.width * max(self.scales) ** 2
        outputs = 16.0 * self.num_classes + 12.0 * len(self.scales) + 32.0
        return max(activations, outputs) + 24.0

    def forward_bytes(self, height: int, width: int, batch: int = 1) -> int:
        """Estimated peak bytes of predicting ``batch`` images of ``height x width`` whole."""
        ph, pw = padded_size((height, width))
        return int(batch * ph * pw * self.bytes_per_pixel() + 2 * self.weight_bytes)

    def band_bytes(self, tile: int, image_width: int) -> int:
        """The stitcher's float32 band for tiles of ``tile`` rows over ``image_width`` columns."""
        return 4 * (self.num_classes + len(self.scales) + 1) * tile * image_width

    def tiled_bytes(self, height: int, width: int, tiling: Tiling) -> int:
        """Estimated peak bytes of predicting one image in tiles: one tile's forward, its weighted
        copy, the band twice (moving it down copies the overlapping rows), the image and labels."""
        tile_h, tile_w = min(tiling.tile, height), min(tiling.tile, width)
        weighted = 4 * (self.num_classes + len(self.scales)) * tile_h * tile_w
        return self.forward_bytes(tile_h, tile_w) + weighted + 2 * self.band_bytes(tile_h, width) + 4 * height * width


def choose_tile(model: MemoryModel, height: int, width: int, budget: int, overlap: int | None = None) -> Tiling:
    """The largest tiling (tile = 8k+1, default overlap a quarter of it) whose estimate fits ``budget``.

    Tiles start on the model's scale quantum (:func:`msattn.tiling.layout.scale_quantum`) and
    their side minus one is a multiple of it, so every scale's grid is exact on every tile.
    """
    largest = max(height, width)
    quantum = scale_quantum(model.scales)
    unit = quantum // STRIDE  # tile - 1 a multiple of the quantum: every scale's grid is exact on the tile
    best = None
    lo, hi = -(-max(MIN_TILE - 1, 2 * quantum) // quantum), max(1, (min(largest, 65537) - 1) // quantum)
    while lo <= hi:  # binary search: the estimate grows with the tile
        mid = (lo + hi) // 2
        tile = STRIDE * unit * mid + 1
        tiling = Tiling(tile, _fitting_overlap(tile, overlap, quantum), quantum)
        if model.tiled_bytes(height, width, tiling) <= budget:
            best, lo = tiling, mid + 1
        else:
            hi = mid - 1
    if best is None:
        need = model.tiled_bytes(height, width, Tiling(MIN_TILE, default_overlap(MIN_TILE)))
        raise ResourceError(
            f"even {MIN_TILE}x{MIN_TILE} tiles need about {format_bytes(need)}, over the memory budget of "
            f"{format_bytes(budget)}: raise --max-memory, use fewer --scales, or a smaller image"
        )
    return best


def _fitting_overlap(tile: int, overlap: int | None, quantum: int) -> int:
    if overlap is None:
        return default_overlap(tile, quantum)
    return min(quantum * math.ceil(overlap / quantum), quantum * ((tile - 1 - quantum) // quantum))


def memory_model_from_args(
    model_args: dict, scales: Sequence[float] | None = None, weight_bytes: int = 0, stride: int = STRIDE,
    grid_exact: bool = True,
) -> MemoryModel:  # fmt: skip
    """A :class:`MemoryModel` from a checkpoint's ``model_args`` (and the scales actually run, the model's
    stride and whether its grid is exact)."""
    run = tuple(float(s) for s in (scales or model_args.get("scales") or (1.0,)))
    return MemoryModel(float(model_args.get("width", 1.0)), int(model_args["num_classes"]), run, int(weight_bytes),
                       str(model_args.get("backbone", "vgg16_largefov")), int(stride), bool(grid_exact))  # fmt: skip
