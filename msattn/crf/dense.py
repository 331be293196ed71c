"""Fully connected CRF (Krähenbühl & Koltun) on class probabilities, as in DeepLab: one image.

``pydensecrf`` (package ``pydensecrf2``) is imported only when a CRF actually runs
(:func:`import_densecrf`); the settings are :class:`msattn.config.crf.CRFParams`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from msattn.config.crf import CRFParams
from msattn.errors import DependencyError

PROB_FLOOR = 1e-8  # probabilities are clipped to this before -log


def import_densecrf() -> Any:
    """The pydensecrf module, or a DependencyError that says how to install it."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise DependencyError(
            f"the dense CRF needs pydensecrf ({exc}); install it with: pip install pydensecrf2"
        ) from None
    return dcrf


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
    """Refine class probabilities with the fully connected CRF.

    image: uint8 [H,W,3] RGB; probs: float [C,H,W] (softmax output); returns float32 [C,H,W]
    (the mean-field marginals, summing to 1 over C).
    """
    params = params or CRFParams()
    dcrf = import_densecrf()
    if probs.ndim != 3 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf wants image [H,W,3] and probs [C,H,W], got {image.shape} and {probs.shape}")
    num_classes, height, width = probs.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but probabilities are {width}x{height}")
    unary = -np.log(np.clip(probs.astype(np.float32), PROB_FLOOR, 1.0)).reshape(num_classes, -1)
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    crf.addPairwiseBilateral(
        sxy=params.bi_xy_std,
        srgb=params.bi_rgb_std,
        rgbim=np.array(image, dtype=np.uint8, order="C"),  # a writable copy: pydensecrf needs one
        compat=params.bi_w,
    )
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(num_classes, height, width)
