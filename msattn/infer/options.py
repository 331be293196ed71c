"""How a trained model is run: one :class:`InferenceOptions`, built once and passed down whole.

``msattn evaluate`` and ``msattn predict`` build it from their flags (:mod:`msattn.cli.app`),
training's validation from the recipe's ``[eval]`` (:meth:`InferenceOptions.from_recipe`);
evaluate fills the flags that were not given from the checkpoint's recipe
(:meth:`InferenceOptions.filled_from`). Everything below (the runner, backends, tiling) reads
the one value instead of eight arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from msattn.config.recipe import EvalConfig
from msattn.errors import UsageError
from msattn.geometry import is_grid_side
from msattn.sizes import parse_memory
from msattn.tiling.run import TilingOptions

#: autocast modes: bf16 (evaluate/predict on CUDA by default), fp16 (training with train.amp = "fp16"), off
AMP_MODES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass(frozen=True)
class InferenceOptions:
    """Everything that says how images go through a model (None: the model's or the recipe's default).

    ``scales`` test-time scales; ``flip`` average with the mirrored image; ``amp`` autocast on
    CUDA (never on CPU); ``pad_to`` pad every image to this 8k+1 side (DeepLab's 513);
    ``batch_size`` images per forward; ``compile_graphs``/``bucket`` CUDA graphs over size
    buckets (:mod:`msattn.infer.graphs`); ``tiling`` tiles for images too large to run whole
    (:class:`msattn.tiling.run.TilingOptions`: by ``--tile`` or the memory budget; None: never);
    ``device`` cpu, cuda or cuda:N (None: cuda when available).
    """

    scales: tuple[float, ...] | None = None
    flip: bool = False
    amp: str = "bf16"
    pad_to: int | None = None
    batch_size: int | None = None
    compile_graphs: bool = True
    bucket: int | None = None
    tiling: TilingOptions | None = None  # None: never tile (training's validation)
    device: str | None = None

    def __post_init__(self) -> None:
        if self.scales is not None:
            object.__setattr__(self, "scales", tuple(float(s) for s in self.scales) or None)
        if self.amp not in AMP_MODES:
            raise UsageError(f"amp: choose one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.pad_to is not None and (self.pad_to < 9 or not is_grid_side(self.pad_to)):
            raise UsageError(f"--pad-to: must be a side of 8k+1 pixels (e.g. 321, 513), got {self.pad_to}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size: must be >= 1, got {self.batch_size}")

    def amp_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype on ``device``: ``amp``'s on CUDA, None on CPU (bf16 is ~100x slower there)."""
        return AMP_MODES[self.amp] if device.type == "cuda" else None

    def replace(self, **changes: object) -> InferenceOptions:
        """A copy with some options changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def filled_from(self, cfg: EvalConfig | None) -> InferenceOptions:
        """These options, each one not given (None) taken from a recipe's ``[eval]`` section; tiled by need.

        The batch size is not filled: evaluate and predict choose it with the graph policy
        (:func:`msattn.infer.graphs.inference_batch_size`)."""
        if cfg is None:
            return self.replace(tiling=self.tiling or TilingOptions())
        tiling = self.tiling or TilingOptions()
        budget = parse_memory(cfg.max_memory, "eval.max_memory") if cfg.max_memory else None
        return self.replace(
            scales=self.scales if self.scales is not None else cfg.scales,
            pad_to=self.pad_to if self.pad_to is not None else cfg.pad_to,
            tiling=TilingOptions(
                tile=tiling.tile if tiling.tile is not None else cfg.tile,
                overlap=tiling.overlap if tiling.overlap is not None else cfg.overlap,
                max_memory=tiling.max_memory if tiling.max_memory is not None else budget,
            ),
        )

    @classmethod
    def from_recipe(cls, cfg: EvalConfig, amp: str = "bf16") -> InferenceOptions:
        """Training's validation: the recipe's ``[eval]`` (no tiling), eager, with the training's autocast."""
        return cls(scales=cfg.scales, flip=cfg.flip, amp=amp, pad_to=cfg.pad_to, batch_size=cfg.batch_size,
                   compile_graphs=False)  # fmt: skip

