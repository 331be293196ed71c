"""The forward pass of prediction: normalised images in, class probabilities and merge weights at image size out.

:func:`predict_batch` (a batch of same-size images) and :func:`predict_probs` (one image) are
the small reusable pieces that predict, evaluate, the CUDA-graph runner and tiling build on;
:meth:`msattn.infer.options.InferenceOptions.amp_dtype` says when to autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from msattn.geometry import crop_to, pad_to_grid, resize_bilinear, resize_nearest, upsample_logits


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def predict_batch(
    model: torch.nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class probabilities and merge weights at image size for a batch of same-size images.

    images: normalised float [N,3,H,W] on the model's device. The batch is padded (bottom and
    right, with the mean colour) to the next 8k+1 side, or to ``pad_to`` (e.g. 513) when it
    fits, so that the output grid is exact (:mod:`msattn.geometry`); the results are cropped
    back. Returns float32 ``probs`` [N,C,H,W] (softmax of the corner-aligned upsampled merged
    logits) and ``attention`` [N,S,H,W] (the model's merge weights at image size; for max
    merging the one-hot map of the winning scale, kept one-hot by nearest upsampling) or
    None for a single-scale model. ``flip`` averages with the mirrored image.
    ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the network under autocast.
    """
    nearest = getattr(model, "merge", None) == "max"
    with torch.inference_mode(), _autocast(images.device, amp_dtype):
        probs, attention = _forward(model, images, scales, nearest, pad_to)
        if flip:
            probs_f, attention_f = _forward(model, images.flip(-1), scales, nearest, pad_to)
            probs = (probs + probs_f.flip(-1)) / 2
            if attention is not None and attention_f is not None:
                attention = (attention + attention_f.flip(-1)) / 2
    return probs, attention


def _forward(
    model: torch.nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] | None,
    nearest: bool,
    pad_to: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    size = tuple(images.shape[-2:])
    padded = pad_to_grid(images, pad_to)  # [N,3,8k+1,8l+1], mean colour below and right
    full = tuple(padded.shape[-2:])
    output = model(padded, scales=scales)
    logits = crop_to(upsample_logits(output["out"].float(), full), size)
    probs = torch.softmax(logits, dim=1)  # [N,C,H,W]
    attention = output.get("attention")
    if attention is not None:
        resize = resize_nearest if nearest else resize_bilinear  # bilinear keeps weights summing to 1
        attention = crop_to(resize(attention.float(), full), size)
    return probs, attention


def predict_probs(
    model: torch.nn.Module,
    image: torch.Tensor,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One normalised image [1,3,H,W] (or [3,H,W]) -> (probs [C,H,W], attention [S,H,W] or None).

    See :func:`predict_batch`; tensors stay on the model's device, float32.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"predict_probs wants one image [1,3,H,W], got {tuple(image.shape)}")
    probs, attention = predict_batch(model, image, scales=scales, flip=flip, amp_dtype=amp_dtype, pad_to=pad_to)
    return probs[0], None if attention is None else attention[0]
