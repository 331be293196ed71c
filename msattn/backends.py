"""Forward backends for ``msattn predict``: the same pipeline on PyTorch or on an exported ONNX model.

A backend turns a batch of uint8 RGB images ``[N, H, W, 3]`` into class probabilities
``[N, C, H, W]`` and merge weights ``[N, S, H, W]`` (or None) at image size, float32 numpy,
with :func:`msattn.engine.predict.predict_batch`'s geometry (pad to 8k+1, crop back). It also
says what predict needs to write and to plan tiles: ``classes``, ``palette``, ``mean``/``std``,
``scales``, ``merge``, ``num_classes``, ``crf_section`` (the recipe's ``[crf]``), ``model_args``
and ``weight_bytes``. :func:`open_backend` is the one place that picks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msattn.errors import UsageError

BACKENDS = ("torch", "onnxruntime")


class TorchBackend:
    """The checkpoint's model on a device (channels_last; bf16 autocast on CUDA with ``amp``)."""

    name = "torch"

    def __init__(
        self,
        checkpoint: Path,
        device: torch.device,
        scales: Sequence[float] | None = None,
        amp: bool = True,
        pad_to: int | None = None,
    ) -> None:
        from msattn.engine.checkpoint import load_checkpoint, model_from_checkpoint
        from msattn.engine.predict import amp_dtype_for
        from msattn.export.onnx import dataset_info

        state = load_checkpoint(checkpoint)
        self.memory_format = torch.channels_last  # faster on CUDA and CPU (benchmarks/README.md)
        self.model = model_from_checkpoint(state, checkpoint).to(device, memory_format=self.memory_format)
        self.device = device
        self.source = str(checkpoint)
        self.state = state
        self.scales = tuple(float(s) for s in (scales or self.model.scales))
        if getattr(self.model, "head", None) is not None and len(self.scales) != len(self.model.scales):
            raise UsageError(
                f"--scales: this attention model was trained on {len(self.model.scales)} scales "
                f"{list(self.model.scales)}; give as many or none"
            )
        self.num_classes = int(self.model.num_classes)
        info = dataset_info(state, self.num_classes)
        self.classes = info["classes"]
        self.palette = np.asarray(info["palette"], dtype=np.uint8).reshape(-1, 3)
        self.mean, self.std = tuple(info["mean"]), tuple(info["std"])
        self.merge = getattr(self.model, "merge", "attention")
        self.crf_section = (state.get("config") or {}).get("crf")
        self.model_args = dict(state.get("model_args") or {})
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.amp_dtype = amp_dtype_for(device, amp)
        self.pad_to = pad_to

    def describe(self) -> str:
        return f"torch {self.source} on {self.device}"

    def forward(self, images: np.ndarray, flip: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [N, H, W, 3] -> (probs float32 [N, C, H, W], attention float32 [N, S, H, W] or None)."""
        from msattn.data.transforms import normalize_image
        from msattn.engine.predict import predict_batch

        batch = torch.stack([normalize_image(img, self.mean, self.std) for img in images])
        batch = batch.to(self.device, memory_format=self.memory_format)  # [N, 3, H, W]
        probs, attention = predict_batch(
            self.model, batch, scales=self.scales, flip=flip, amp_dtype=self.amp_dtype, pad_to=self.pad_to
        )
        return probs.cpu().numpy(), None if attention is None else attention.cpu().numpy()


def open_backend(
    backend: str | None,
    checkpoint: Path | None,
    model: Path | None,
    device: torch.device,
    scales: Sequence[float] | None = None,
    amp: bool = True,
    pad_to: int | None = None,
) -> Any:
    """The backend ``--backend`` names (default: torch with --checkpoint, onnxruntime with --model)."""
    if backend is None:
        backend = "onnxruntime" if model is not None else "torch"
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend}: choose torch or onnxruntime")
    if backend == "torch":
        if checkpoint is None:
            hint = " (an .onnx --model runs with --backend onnxruntime)" if model is not None else ""
            raise UsageError(f"--checkpoint: the torch backend needs a checkpoint (.pt){hint}")
        if model is not None:
            raise UsageError("--model: give --checkpoint for the torch backend or --model for onnxruntime, not both")
        return TorchBackend(Path(checkpoint), device, scales, amp, pad_to)
    if model is None:
        raise UsageError("--model: the onnxruntime backend needs an exported model (msattn export ... --out model.onnx)")
    if checkpoint is not None:
        raise UsageError("--checkpoint: the onnxruntime backend runs --model; give one of the two")
    from msattn.export.runtime import OnnxBackend

    return OnnxBackend(Path(model), scales, pad_to)


def memory_model(backend: Any) -> Any:
    """The tiling estimate's view of a backend's model (:class:`msattn.tiling.memory.MemoryModel`)."""
    from msattn.tiling.memory import memory_model_from_args

    args = dict(backend.model_args or {})
    args.setdefault("num_classes", backend.num_classes)
    return memory_model_from_args(args, backend.scales, backend.weight_bytes)


__all__ = ["BACKENDS", "TorchBackend", "memory_model", "open_backend"]
