"""Forward backends for ``msattn predict``: the same pipeline on PyTorch or on an exported ONNX model.

A backend turns a batch of uint8 RGB images ``[N, H, W, 3]`` into class probabilities
``[N, C, H, W]`` and merge weights ``[N, S, H, W]`` (or None) at image size, float32 numpy,
with :func:`msattn.infer.forward.predict_batch`'s geometry (pad to 8k+1, crop back). It also
says what predict needs to write and to plan tiles: ``classes``, ``palette``, ``mean``/``std``,
``scales``, ``merge``, ``num_classes``, ``crf_section`` (the recipe's ``[crf]``), ``model_args``
``weight_bytes``, ``sha256`` (the file's identity), ``note`` (a remark on the scales or None),
``group_key`` (images of one key form one batch) and ``predict_group``. :func:`open_backend`
is the one place that picks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msattn.data.transforms import normalize_image
from msattn.errors import UsageError
from msattn.export.runtime import OnnxBackend
from msattn.geometry import STRIDE
from msattn.infer.files import _dataset_info
from msattn.infer.forward import predict_batch
from msattn.infer.graphs import make_runner
from msattn.infer.options import InferenceOptions
from msattn.infer.scales import resolve_scales
from msattn.io import file_sha256
from msattn.runtime.checkpoint import load_checkpoint, model_from_checkpoint
from msattn.tiling.memory import memory_model_from_args

BACKENDS = ("torch", "onnxruntime")


class TorchBackend:
    """The checkpoint's model on a device (channels_last; bf16 autocast on CUDA with ``amp``).

    Batches go through an :class:`msattn.infer.graphs.InferenceRunner`: eager (exactly
    :func:`msattn.infer.forward.predict_batch`), or on CUDA one captured graph per size bucket.
    """

    name = "torch"

    def __init__(self, checkpoint: Path, device: torch.device, options: InferenceOptions = InferenceOptions()) -> None:
        state = load_checkpoint(checkpoint)
        self.memory_format = torch.channels_last  # faster on CUDA and CPU (benchmarks/README.md)
        self.model = model_from_checkpoint(state, checkpoint).to(device, memory_format=self.memory_format)
        self.device = device
        self.source = str(checkpoint)
        self.sha256 = file_sha256(Path(checkpoint))
        self.state = state
        self.scales, self.note = resolve_scales(options.scales, self.model)  # an attention head's trained order
        self.num_classes = int(self.model.num_classes)
        info = _dataset_info(state, self.num_classes, checkpoint)  # metadata checked key by key
        self.classes, self.palette = list(info.classes), np.asarray(info.palette, dtype=np.uint8).reshape(-1, 3)
        self.mean, self.std = tuple(info.mean), tuple(info.std)
        self.merge = getattr(self.model, "merge", "attention")
        self.crf_section = (state.get("config") or {}).get("crf")
        self.model_args = dict(state.get("model_args") or {})
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.amp_dtype = options.amp_dtype(device)
        self.pad_to = options.pad_to
        self.runner = make_runner(self.model, options.replace(flip=False), device, self.scales)
        self.group_key = self.runner.group_key

    def describe(self) -> str:
        return f"torch {self.source} on {self.device}"

    def summary(self) -> str:
        return self.runner.summary()

    def forward(self, images: np.ndarray, flip: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [N, H, W, 3] -> (probs float32 [N, C, H, W], attention float32 [N, S, H, W] or None)."""
        batch = torch.stack([normalize_image(img, self.mean, self.std) for img in images])
        batch = batch.to(self.device, memory_format=self.memory_format)  # [N, 3, H, W]
        probs, attention = predict_batch(
            self.model, batch, scales=self.scales, flip=flip, amp_dtype=self.amp_dtype, pad_to=self.pad_to
        )
        return probs.cpu().numpy(), None if attention is None else attention.cpu().numpy()

    def predict_group(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """uint8 [H_i, W_i, 3] images of one :attr:`group_key` -> [(probs [C,H_i,W_i], attention or None)]."""
        if self.runner.policy.enabled:  # one size bucket: sizes may differ, the runner pads to the bucket
            batch: Any = [normalize_image(img, self.mean, self.std).to(self.device) for img in images]
        else:  # one size: one batch [N, 3, H, W]
            batch = torch.stack([normalize_image(img, self.mean, self.std) for img in images])
            batch = batch.to(self.device, memory_format=self.memory_format)
        return [(p.cpu().numpy(), None if a is None else a.cpu().numpy()) for p, a in self.runner.predict(batch)]


def open_backend(
    backend: str | None, checkpoint: Path | None, model: Path | None, device: torch.device, options: InferenceOptions
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
        return TorchBackend(Path(checkpoint), device, options)
    if model is None:
        raise UsageError("--model: the onnxruntime backend needs an exported model (msattn export ... --out model.onnx)")
    if checkpoint is not None:
        raise UsageError("--checkpoint: the onnxruntime backend runs --model; give one of the two")
    return OnnxBackend(Path(model), options.scales, options.pad_to)


def memory_model(backend: Any) -> Any:
    """The tiling estimate's view of a backend's model (:class:`msattn.tiling.memory.MemoryModel`)."""
    args = dict(backend.model_args or {})
    args.setdefault("num_classes", backend.num_classes)
    model = getattr(backend, "model", None)  # the torch backend's ScaleNet (an ONNX file: its metadata only)
    stride = int(getattr(model, "stride", STRIDE))
    exact = bool(getattr(getattr(model, "backbone", None), "grid_exact", True))
    return memory_model_from_args(args, backend.scales, backend.weight_bytes, stride, exact)
