"""Running an exported model with onnxruntime: the session, its metadata, and a predict backend.

:class:`OnnxBackend` has the interface of :class:`msattn.backends.TorchBackend`, so
``msattn predict --backend onnxruntime --model model.onnx`` runs the same pipeline (batches,
tiling, CRF, outputs) on the exported graph, without PyTorch's model code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from msattn.errors import CheckpointError, UsageError
from msattn.export.format import FORMAT, require
from msattn.io import file_sha256


class OnnxSession:
    """An onnxruntime CPU session of an msattn ONNX file and its ``msattn.*`` metadata."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        require("onnxruntime", what="the onnxruntime backend")
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise UsageError(f"{path}: ONNX model not found")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: onnxruntime cannot load it: {first}") from None
        self.path = path
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.meta.get("msattn.format") != FORMAT:
            raise CheckpointError(f"{path}: not an ONNX model written by msattn export (no msattn.format metadata)")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def json(self, key: str, default: Any = None) -> Any:
        """A JSON metadata value (``default`` when absent or empty)."""
        text = self.meta.get(f"msattn.{key}", "")
        return json.loads(text) if text else default

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [N, H, W, 3] -> {output name: array}."""
        values = self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.uint8)})
        return dict(zip(self.output_names, values))


class OnnxBackend:
    """Predict backend on an exported model: uint8 images in, probabilities and merge weights out (numpy)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, scales: Any = None, pad_to: int | None = None, threads: int | None = None) -> None:
        self.session = OnnxSession(path, threads)
        self.source = str(path)
        self.scales = tuple(float(s) for s in self.session.json("scales", [1.0]))
        if scales and tuple(float(s) for s in scales) != self.scales:
            raise UsageError(
                f"--scales: {path} was exported for scales {list(self.scales)}; export again with "
                "--scales to run others (msattn export --scales ...)"
            )
        if pad_to is not None:
            raise UsageError("--pad-to: the exported graph pads each image to its own next 8k+1 side; "
                             "use --backend torch for a fixed --pad-to")  # fmt: skip
        if "probs" not in self.session.output_names:
            raise CheckpointError(f"{path}: has no 'probs' output (not an msattn export?)")
        self.merge = self.session.meta.get("msattn.merge", "none")
        args = self.session.json("model_args", {})
        self.classes = [str(c) for c in self.session.json("classes", [])]
        self.num_classes = len(self.classes) or int(args.get("num_classes", 0))
        self.palette = np.asarray(self.session.json("palette", []), dtype=np.uint8).reshape(-1, 3)
        self.mean = tuple(self.session.json("mean", []))
        self.std = tuple(self.session.json("std", []))
        self.crf_section = self.session.json("crf", None)
        self.model_args = args
        self.weight_bytes = Path(path).stat().st_size
        self.sha256 = file_sha256(Path(path))
        self.note = None
        self.amp_dtype = None

    def describe(self) -> str:
        return f"onnxruntime {self.source}"

    def summary(self) -> str:
        return ""

    @staticmethod
    def group_key(size: Any) -> tuple[int, ...]:
        """Images of one size form one batch (the graph takes [N, H, W, 3])."""
        return tuple(int(v) for v in size)

    def predict_group(self, images: Any) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """uint8 [H, W, 3] images of one size -> [(probs [C,H,W], attention [S,H,W] or None)]."""
        probs, attention = self.forward(np.stack(list(images)))
        return [(probs[i], None if attention is None else attention[i]) for i in range(len(probs))]

    def forward(self, images: np.ndarray, flip: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [N, H, W, 3] -> (probs float32 [N, C, H, W], attention float32 [N, S, H, W] or None)."""
        out = self.session.run(images)
        probs, attention = out["probs"], out.get("attention")
        if flip:  # as predict_batch: average with the mirrored image's outputs
            mirrored = self.session.run(images[:, :, ::-1])
            probs = (probs + mirrored["probs"][..., ::-1]) / 2
            if attention is not None:
                attention = (attention + mirrored["attention"][..., ::-1]) / 2
        return probs, attention
