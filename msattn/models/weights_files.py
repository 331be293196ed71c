"""Weights files on disk and from the web: a state dict read safely, or downloaded once into torch's hub cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from msattn.errors import CheckpointError, UsageError


def read_state_file(path: str | Path, what: str) -> dict[str, Any]:
    """A ``.pth``/``.pt`` state dict (weights only); errors name the file."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".caffemodel":
        raise CheckpointError(
            f"{path}: convert the Caffe model first: msattn convert-weights {path} --out init.pt, "
            "then set model.pretrained to init.pt"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} weights not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"{path}: cannot load {what} weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def download_weights(url: str, what: str) -> dict[str, torch.Tensor]:
    """ImageNet weights from ``url``, downloaded once into the torch hub cache (UsageError naming the file offline)."""
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True)
    except Exception as exc:  # noqa: BLE001 - offline, proxy, corrupt download...
        raise UsageError(
            f"cannot download ImageNet {what} weights ({type(exc).__name__}); download {url} by hand and put it at "
            f"{hub_file}, or set model.pretrained to its path"
        ) from None
