"""``msattn bench`` before any timing: the options checked, the device resolved, the run's context.

Everything here fails fast (a bad option or an unwritable ``--json`` stops the run before minutes
of timing) or describes the run (:func:`run_context`: what every record carries).
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from msattn.bench.cases import Settings
from msattn.errors import UsageError
from msattn.outputs import check_output_file

#: the modes of ``--mode`` (tiled, onnx: msattn.bench.deploy)
MODES = ("inference", "train", "data", "train-e2e", "tiled", "onnx")


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; a clear error when CUDA is asked for but absent."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name}: not a device (use cpu, cuda or cuda:N)") from exc
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: bench runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is available to this PyTorch ({torch.__version__})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def check_options(
    modes: Sequence[str], sizes: Sequence[int], width: float, batch: int, iters: int, warmup: int
) -> None:
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UsageError(f"--mode {unknown[0]}: unknown mode (choose from {', '.join(MODES)})")
    if any(s < 8 for s in sizes):
        raise UsageError(f"--size {min(sizes)}: the input side must be at least 8 pixels")
    if not 0 < width <= 4 or batch < 1 or iters < 1 or warmup < 0:
        raise UsageError("need 0 < --width <= 4, --batch >= 1, --iters >= 1, --warmup >= 0")


def check_json(path: Path) -> None:
    """``--json`` is a writable file name, and not a file that bench did not write (a list of records)."""
    def ours(existing: Path) -> bool:
        try:
            data = json.loads(existing.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, list) and all(isinstance(r, dict) and "mode" in r and "scales" in r for r in data)

    check_output_file(path, "--json", ours=ours)


def workers_option(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit():
        raise UsageError(f"--workers {text}: an integer >= 0 or auto")
    return int(text)


def run_context(dev: torch.device, settings: Settings) -> dict[str, Any]:
    """What every record of the run carries: the machine, the settings, the versions, the date."""
    return {
        "device": dev.type,
        "device_name": device_name(dev),
        "batch": settings.batch,
        "amp": settings.amp,
        "channels_last": settings.channels_last,
        "compile": settings.compile_model,
        "backbone": settings.backbone,
        "width": settings.width,
        "iters": settings.iters,
        "warmup": settings.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
