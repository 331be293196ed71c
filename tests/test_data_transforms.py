"""Joint transforms: image and label move together, padding values, flips, integer labels, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from msattn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, denormalize_image


def _coded_pair(height: int, width: int, block: int = 1, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """Label of random classes in ``block``-sized squares; image R = 40 * class, G = 4 * row, B = 4 * col."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 6, size=(-(-height // block), -(-width // block)))
    label = np.kron(small, np.ones((block, block), dtype=np.int64))[:height, :width].astype(np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([label.astype(np.int64) * 40, rows * 4, cols * 4], axis=-1).astype(np.uint8)
    label_img = Image.fromarray(label)
    label_img.putpalette([v for i in range(256) for v in (i, i, i)])
    return Image.fromarray(image), label_img


def _run(transform, image, label, seed: int):  # noqa: ANN001, ANN202
    img, lab = transform(image, label, np.random.default_rng(seed))
    return denormalize_image(img, transform.mean, transform.std).astype(np.int64), lab.numpy()


def test_crop_and_flip_keep_image_and_label_aligned_exactly() -> None:
    image, label = _coded_pair(32, 40)
    transform = TrainTransform(crop_size=24, scale_range=None, flip=True)
    flips = set()
    for seed in range(12):
        img, lab = _run(transform, image, label, seed)
        assert img.shape == (24, 24, 3) and lab.shape == (24, 24)
        assert np.array_equal(img[..., 0], lab * 40)  # every pixel still sits on its own label
        assert np.all(np.diff(img[..., 1], axis=0) == 4) and np.all(np.diff(img[..., 1], axis=1) == 0)
        step = np.unique(np.diff(img[..., 2], axis=1))
        assert step.tolist() in ([4], [-4])  # a contiguous crop, mirrored or not
        flips.add(int(step[0]))
    assert flips == {4, -4}


def test_flip_mirrors_image_and_label_together() -> None:
    image, label = _coded_pair(16, 16)
    transform = TrainTransform(crop_size=16, scale_range=None, flip=True)
    outcomes = [_run(transform, image, label, seed) for seed in range(10)]
    original = (np.asarray(image).astype(np.int64), np.asarray(label))
    plain = [o for o in outcomes if np.array_equal(o[1], original[1])]
    mirrored = [o for o in outcomes if np.array_equal(o[1], original[1][:, ::-1])]
    assert plain and mirrored and len(plain) + len(mirrored) == 10
    assert np.array_equal(mirrored[0][0], original[0][:, ::-1])
    no_flip = TrainTransform(crop_size=16, scale_range=None, flip=False)
    assert all(np.array_equal(_run(no_flip, image, label, s)[1], original[1]) for s in range(10))


def test_padding_uses_the_mean_colour_and_ignore_label() -> None:
    image, label = _coded_pair(10, 12)
    transform = TrainTransform(crop_size=20, scale_range=None, flip=False)
    tensor, lab = transform(image, label, np.random.default_rng(0))
    assert tensor.shape == (3, 20, 20) and lab.shape == (20, 20)
    assert torch.all(lab[10:, :] == 255) and torch.all(lab[:, 12:] == 255)
    assert torch.equal(lab[:10, :12], torch.from_numpy(np.asarray(label).astype(np.int64)))
    assert tensor[:, 10:, :].abs().max() < 0.01 and tensor[:, :, 12:].abs().max() < 0.01  # mean colour -> ~0
    img = denormalize_image(tensor, IMAGENET_MEAN, IMAGENET_STD)
    assert img[15, 15].tolist() == [round(m * 255) for m in IMAGENET_MEAN]
    assert TrainTransform(crop_size=20, scale_range=None, ignore_index=7)(image, label, np.random.default_rng(0))[1][15, 15] == 7


def test_random_scale_keeps_labels_integer_and_aligned() -> None:
    image, label = _coded_pair(48, 48, block=8, seed=3)
    transform = TrainTransform(crop_size=32, scale_range=(0.5, 2.0), flip=True)
    originals = set(np.unique(np.asarray(label)).tolist())
    sizes_seen = 0
    for seed in range(10):
        tensor, lab_t = transform(image, label, np.random.default_rng(seed))
        assert lab_t.dtype == torch.int64 and tensor.dtype == torch.float32
        lab = lab_t.numpy()
        assert set(np.unique(lab).tolist()) <= originals | {255}
        red = denormalize_image(tensor, transform.mean, transform.std)[..., 0].astype(np.int64)
        # away from block edges (uniform 3x3 neighbourhood) the colour matches the label
        padded = np.pad(lab, 1, mode="edge")
        uniform = np.ones_like(lab, dtype=bool)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                uniform &= padded[dy : dy + 32, dx : dx + 32] == lab
        inside = uniform & (lab != 255)
        inside[[0, -1], :] = inside[:, [0, -1]] = False  # the crop border has unseen neighbours
        assert inside.sum() > 100
        assert np.abs(red[inside] - lab[inside] * 40).max() <= 8  # PIL's antialiasing blurs a little
        # the label fits the image better than the same label shifted by one pixel (edges blur, so not 100%)
        def fit(dy: int, dx: int) -> float:
            shifted = np.roll(lab, (dy, dx), axis=(0, 1))
            return float((np.abs(red - shifted * 40) < 20)[shifted != 255].mean())

        assert fit(0, 0) > 0.88
        assert fit(0, 0) > max(fit(0, 1), fit(0, -1), fit(1, 0), fit(-1, 0)) + 0.02
        sizes_seen += int((lab == 255).any())
    assert sizes_seen > 0  # some draws scaled below the crop and were padded


def test_same_generator_same_sample() -> None:
    image, label = _coded_pair(40, 40, block=4)
    transform = TrainTransform(crop_size=24, scale_range=(0.6, 1.4), flip=True)
    a = transform(image, label, np.random.default_rng(11))
    b = transform(image, label, np.random.default_rng(11))
    c = transform(image, label, np.random.default_rng(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_eval_transform_normalises_without_resizing() -> None:
    image, label = _coded_pair(13, 17)
    img, lab = EvalTransform()(image, label)
    assert img.shape == (3, 13, 17) and lab.shape == (13, 17) and lab.dtype == torch.int64
    pixel = np.asarray(image)[5, 7] / 255.0
    expected = (pixel - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(img[:, 5, 7].numpy(), expected, atol=1e-5)
    assert torch.equal(lab, torch.from_numpy(np.asarray(label).astype(np.int64)))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(crop_size=8, scale_range=(1.5, 0.5))
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(crop_size=0)
