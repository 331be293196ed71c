"""Joint image/label transforms for training and evaluation.

Transforms are called as ``transform(image, label, rng)`` with PIL images (RGB image, P/L label) and
a :class:`numpy.random.Generator`, and return ``(FloatTensor[3, H, W], LongTensor[H, W])``. Every
random choice comes from ``rng`` (in this order: scale, crop top, crop left, flip), so a sample is
reproducible from its generator; :class:`msattn.data.datasets.SegmentationFolder` derives one per item.
Images are resized bilinearly, labels with nearest neighbour, both with PIL (pixel-centre
aligned), so labels stay integer and aligned with the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL.Image import Image, Resampling

#: torchvision's ImageNet statistics on [0, 1] RGB (torchvision's VGG-16 weights)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Caffe's VGG-16 / DeepLab convention: 0..255 minus the mean (R 122.675, G 116.669, B 104.008),
#: written on [0, 1] RGB like the others (conv1_1 of converted Caffe weights takes RGB)
CAFFE_MEAN: tuple[float, float, float] = (122.675 / 255, 116.669 / 255, 104.008 / 255)
CAFFE_STD: tuple[float, float, float] = (1 / 255, 1 / 255, 1 / 255)
#: EfficientNet-Lite's convention (TensorFlow's efficientnet_lite_builder: MEAN_RGB 127, STDDEV_RGB 128 on
#: 0..255, "inception-style" for post-quantization), i.e. about 0.498 / 0.502 on [0, 1]
LITE_MEAN: tuple[float, float, float] = (127 / 255, 127 / 255, 127 / 255)
LITE_STD: tuple[float, float, float] = (128 / 255, 128 / 255, 128 / 255)
#: model.input_norm -> (mean, std)
INPUT_NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "torchvision": (IMAGENET_MEAN, IMAGENET_STD),
    "caffe": (CAFFE_MEAN, CAFFE_STD),
    "efficientnet_lite": (LITE_MEAN, LITE_STD),
}


def normalize_image(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8[H, W, 3]`` RGB -> ``float32[3, H, W]`` as ``(x / 255 - mean) / std``."""
    tensor = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


def denormalize_image(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Inverse of :func:`normalize_image`: ``float[3, H, W]`` -> ``uint8[H, W, 3]``."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    image = (tensor.detach().float().cpu() * std_t + mean_t).mul(255.0).round().clamp(0, 255)
    return image.byte().permute(1, 2, 0).numpy()


def _label_array(label: Image) -> np.ndarray:
    return np.asarray(label, dtype=np.uint8) if label.mode in ("P", "L") else np.asarray(label).astype(np.int64)


class EvalTransform:
    """Full-resolution image and label as tensors (no resize), normalised with ``mean``/``std``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(
        self, image: Image, label: Image, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(PIL RGB, PIL label[, rng])`` -> ``(float32[3, H, W], int64[H, W])``; ``rng`` is unused."""
        return normalize_image(np.asarray(image.convert("RGB")), self.mean, self.std), torch.from_numpy(
            _label_array(label).astype(np.int64)
        )

    def __repr__(self) -> str:
        return f"EvalTransform(mean={self.mean}, std={self.std})"


class TrainTransform:
    """Random scale, pad-and-crop to ``crop_size``, horizontal flip, normalisation.

    ``scale_range=(lo, hi)`` resizes by ``s ~ U(lo, hi)`` (``None``: no scaling). Images smaller
    than the crop are padded at the bottom/right with the mean colour (0 after normalisation), labels
    with ``ignore_index``; then a random ``crop_size`` square is cut and flipped with probability 1/2.

    ``output="uint8"`` returns the crop before normalisation, ``uint8[3, c, c]`` and the label as
    ``uint8[c, c]`` (5x fewer bytes to move); :class:`msattn.runtime.loader.DeviceBatches`
    normalises on the device to exactly the float32 values of ``output="float"``.
    """

    def __init__(
        self,
        crop_size: int,
        scale_range: tuple[float, float] | None = (0.5, 1.5),
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = 255,
        output: str = "float",
    ) -> None:
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if scale_range is not None and not (0 < scale_range[0] <= scale_range[1]):
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range}")
        self.crop_size = int(crop_size)
        self.scale_range = tuple(scale_range) if scale_range is not None else None
        self.flip = flip
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index
        self.fill = tuple(int(round(m * 255)) for m in self.mean)
        self.output = output

    def __call__(
        self, image: Image, label: Image, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(PIL RGB, PIL label, rng)`` -> ``(float32[3, c, c], int64[c, c])``, ``c = crop_size``."""
        rng = rng if rng is not None else np.random.default_rng()
        image = image.convert("RGB")
        if image.size != label.size:
            raise ValueError(f"image is {image.size}, label is {label.size}")
        if self.scale_range is not None:
            scale = float(rng.uniform(*self.scale_range))
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            if size != image.size:
                image = image.resize(size, Resampling.BILINEAR)
                label = label.resize(size, Resampling.NEAREST)
        img, lab = np.asarray(image), _label_array(label)

        c = self.crop_size
        pad_h, pad_w = max(c - img.shape[0], 0), max(c - img.shape[1], 0)
        if pad_h or pad_w:
            padded = np.empty((img.shape[0] + pad_h, img.shape[1] + pad_w, 3), dtype=np.uint8)
            padded[...] = np.array(self.fill, dtype=np.uint8)
            padded[: img.shape[0], : img.shape[1]] = img
            lab_padded = np.full(padded.shape[:2], self.ignore_index, dtype=lab.dtype)
            lab_padded[: lab.shape[0], : lab.shape[1]] = lab
            img, lab = padded, lab_padded

        top = int(rng.integers(0, img.shape[0] - c + 1))
        left = int(rng.integers(0, img.shape[1] - c + 1))
        img, lab = img[top : top + c, left : left + c], lab[top : top + c, left : left + c]
        if self.flip and rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        if self.output == "uint8":  # [3, c, c] over HWC memory, like normalize_image's result
            image_u8 = torch.from_numpy(np.require(img, np.uint8, ["C", "W"])).permute(2, 0, 1)
            label_t = np.require(lab, None, ["C", "W"]) if lab.dtype == np.uint8 else lab.astype(np.int64)
            return image_u8, torch.from_numpy(label_t)
        return normalize_image(img, self.mean, self.std), torch.from_numpy(lab.astype(np.int64))

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, flip={self.flip}, "
            f"mean={self.mean}, std={self.std}, ignore_index={self.ignore_index}"
            + (f", output={self.output!r})" if self.output != "float" else ")")
        )
