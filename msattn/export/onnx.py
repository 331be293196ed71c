"""``msattn export``: a checkpoint -> one ONNX graph of the whole multi-scale model.

The graph (:class:`msattn.export.graph.DeployGraph`) takes ``image``, uint8 ``[N, H, W, 3]``
RGB of any size (dynamic N, H, W by default), normalises and pads it itself and returns
``probs`` ``[N, C, H, W]`` float32, ``attention`` ``[N, S, H, W]`` float32 (multi-scale models)
and, with ``--argmax``, ``labels`` ``[N, H, W]`` uint8.

**Exporter.** ``torch.export`` (the ``dynamo=True`` path of ``torch.onnx.export``) with
explicit dimensions: ``torch.export.export`` fails loudly when anything would fix H or W to
the example's size, and the resulting ExportedProgram is translated to ONNX (opset 18 or
newer; the default is the exporter's, 20 with torch 2.13). The TorchScript exporter
(``dynamo=False``) also produces a correct dynamic graph of :class:`DeployGraph`, but it is
deprecated since torch 2.9 and, given code that bakes a size in, exports it silently;
``torch.onnx.export(..., dynamo=True)`` called on the module directly does the same (it
falls back to a static graph), which is why the program is exported first.

**Metadata** (``metadata_props``, all strings, JSON where structured): ``msattn.format``,
``msattn.version``, ``msattn.checkpoint`` and ``msattn.checkpoint_sha256``, ``msattn.classes``,
``msattn.palette``, ``msattn.scales``, ``msattn.merge``, ``msattn.model_args``, ``msattn.backbone``, ``msattn.input``,
``msattn.normalization`` (``inside``: done by the graph; ``msattn.mean``/``msattn.std`` for
reference), ``msattn.outputs``, ``msattn.dynamic``, ``msattn.opset``, ``msattn.crf``
(the recipe's dense-CRF settings), ``msattn.exporter``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from msattn import __version__
from msattn.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from msattn.errors import UsageError
from msattn.export.format import FORMAT, INSTALL_HINT, require
from msattn.export.graph import DeployGraph
from msattn.export.runtime import OnnxSession
from msattn.io import atomic_write, file_sha256
from msattn.models.spec import DEFAULT_BACKBONE, HIERARCHICAL, TIMM_PREFIX, hierarchical_inference_problem
from msattn.runtime.checkpoint import load_checkpoint, model_from_checkpoint, old_arch_warning
from msattn.visualize import voc_palette

MIN_OPSET = 18
EXAMPLE_SIZE = (61, 75)  # odd, not 8k+1: no accidental special case in the trace


def parse_size(text: str) -> tuple[int, int]:
    """``"513x513"`` or ``"480x640"`` (height x width) -> (H, W)."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"--size: expected HEIGHTxWIDTH such as 513x513, got {text!r}")
    return int(parts[0]), int(parts[1])


def _check_out(out: Path, checkpoint: Path) -> None:
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"{out}: the output must be an .onnx file")
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise UsageError(f"{out}: is the checkpoint itself; choose another --out")
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; give a file name such as model.onnx")
    if out.exists() and not _is_msattn_onnx(out):
        raise UsageError(f"{out}: exists and was not written by msattn export; remove it or choose another --out")


def _is_msattn_onnx(path: Path) -> bool:
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return any(p.key == "msattn.format" for p in model.metadata_props)


def _run_scales(model: Any, scales: list[float] | None) -> tuple[float, ...]:
    run = tuple(float(s) for s in (scales or model.scales))
    if any(not (0 < s <= 4) for s in run) or len(set(run)) != len(run):
        raise UsageError(f"--scales: need distinct values in (0, 4], got {list(run)}")
    if getattr(model, "head", None) is not None and len(run) != len(model.scales):
        raise UsageError(
            f"--scales: this attention model was trained on {len(model.scales)} scales {list(model.scales)}; "
            "give as many or none"
        )
    if getattr(model, "merge", None) == HIERARCHICAL and hierarchical_inference_problem(run):
        raise UsageError(f"--scales: {hierarchical_inference_problem(run)}; add 1.0 (e.g. --scales 2 --scales 1 "
                         "--scales 0.5)")  # fmt: skip
    return run


def build_graph(state: dict[str, Any], source: Path, scales: list[float] | None, argmax: bool) -> Any:
    """The checkpoint's model wrapped as a :class:`DeployGraph` (eval mode, CPU)."""
    model = model_from_checkpoint(state, source).cpu().eval()
    run = _run_scales(model, scales)
    info = dataset_info(state, model.num_classes)
    return DeployGraph(model, run, info["mean"], info["std"], argmax=argmax).eval()


def dataset_info(state: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """classes, palette (list of [r, g, b]) and mean/std of a checkpoint (as predict reads them)."""
    ds = state.get("dataset") or {}
    classes = [str(c) for c in ds.get("classes") or []] or [str(i) for i in range(num_classes)]
    palette = ds.get("palette") or voc_palette(num_classes).tolist()
    return {
        "classes": classes,
        "palette": [[int(v) for v in rgb] for rgb in palette],
        "mean": [float(v) for v in ds.get("mean") or IMAGENET_MEAN],
        "std": [float(v) for v in ds.get("std") or IMAGENET_STD],
    }


def trace(graph: Any, dynamic: bool, size: tuple[int, int]) -> Any:
    """``torch.export`` of the graph; with ``dynamic``, N, H and W stay symbolic or this fails."""
    height, width = EXAMPLE_SIZE if dynamic else size
    example = torch.zeros(2 if dynamic else 1, height, width, 3, dtype=torch.uint8)
    shapes = None
    if dynamic:
        dim = torch.export.Dim
        shapes = {"image": {0: dim("batch", min=1, max=4096), 1: dim("height", min=1, max=65536),
                            2: dim("width", min=1, max=65536)}}  # fmt: skip
    try:
        with torch.no_grad():
            return torch.export.export(graph, (example,), dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if dynamic and str(getattr(graph.backbone, "name", "")).startswith(TIMM_PREFIX):
            hint = " (timm models that pad dynamically, e.g. the tf_* ports, export with --static --size HxW)"
        raise UsageError(f"torch.export could not trace the model with {'dynamic' if dynamic else 'static'} sizes: "
                         f"{first}{hint}") from None


def to_onnx(program: Any, output_names: list[str], opset: int | None) -> Any:
    """ExportedProgram -> onnx.ModelProto (dimension names: batch, height, width)."""
    quiet = io.StringIO()
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program, input_names=["image"], output_names=output_names, opset_version=opset, dynamo=True,
                verbose=False,
            )  # fmt: skip
    finally:
        registry.setLevel(level)
    model = onnx_program.model_proto
    _name_dims(model)
    return model


def _name_dims(model: Any) -> None:
    """Give the input's symbolic dims readable names everywhere (s40 -> batch, ...)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    names = {d.dim_param: n for d, n in zip(dims, ("batch", "height", "width")) if d.dim_param}
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in names:
                d.dim_param = names[d.dim_param]


def metadata(state: dict[str, Any], checkpoint: Path, graph: Any, dynamic: bool, opset: int) -> dict[str, str]:
    """The ``metadata_props`` written into the ONNX file."""
    info = dataset_info(state, graph.num_classes)
    crf = (state.get("config") or {}).get("crf")
    outputs = {"probs": "float32 [N, C, H, W] class probabilities (softmax)"}
    if "attention" in graph.output_names():
        outputs["attention"] = ("float32 [N, S, H, W] merge weights per scale (one-hot where max merging won; "
                                "for hierarchical attention the chain's effective weights)")
    if graph.argmax:
        outputs["labels"] = "uint8 [N, H, W] argmax of probs"
    return {
        "msattn.format": FORMAT,
        "msattn.version": __version__,
        "msattn.checkpoint": checkpoint.name,
        "msattn.checkpoint_sha256": file_sha256(checkpoint),
        "msattn.classes": json.dumps(info["classes"]),
        "msattn.palette": json.dumps(info["palette"]),
        "msattn.scales": json.dumps(list(graph.scales)),
        "msattn.merge": graph.merge,
        "msattn.model_args": json.dumps(state.get("model_args") or {}),
        "msattn.backbone": str((state.get("model_args") or {}).get("backbone", DEFAULT_BACKBONE)),
        "msattn.input": "image: uint8 [N, H, W, 3] RGB, any H and W >= 1 (padded to 8k+1 inside the graph)",
        "msattn.normalization": "inside",
        "msattn.mean": json.dumps(info["mean"]),
        "msattn.std": json.dumps(info["std"]),
        "msattn.outputs": json.dumps(outputs),
        "msattn.dynamic": "true" if dynamic else "false",
        "msattn.opset": str(opset),
        "msattn.crf": json.dumps(crf) if crf else "",
        "msattn.exporter": f"torch.export + torch.onnx (dynamo) {torch.__version__}",
    }


def _add_metadata(model: Any, props: dict[str, str]) -> None:
    model.producer_name = "msattn"
    model.producer_version = __version__
    backbone = props.get("msattn.backbone", DEFAULT_BACKBONE)
    model.doc_string = f"msattn: Attention to Scale (share-net on {backbone}), the whole multi-scale model"
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    scales: list[float] | None = None,
    opset: int | None = None,
    dynamic: bool = True,
    size: str = "513x513",
    argmax: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """``msattn export``: write ``out`` (atomically) and, with ``verify``, compare it with PyTorch."""
    require("onnx", "onnxscript")
    checkpoint, out = Path(checkpoint), Path(out)
    if opset is not None and opset < MIN_OPSET:
        raise UsageError(f"--opset: the exporter writes opset {MIN_OPSET} or newer, got {opset}")
    static_size = parse_size(size)
    _check_out(out, checkpoint)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    state = load_checkpoint(checkpoint)
    warning = old_arch_warning(state, checkpoint)
    if warning:
        console.print(f"warning: {warning}", markup=False)
    graph = build_graph(state, checkpoint, scales, argmax)
    start = time.perf_counter()
    shape = "any size" if dynamic else f"{static_size[0]}x{static_size[1]}"
    console.print(f"export: {checkpoint} -> {out}: torch.export, then ONNX ({shape}; about 10 s)...", markup=False)
    with console.status("exporting (torch.export, then ONNX)"):
        model = to_onnx(trace(graph, dynamic, static_size), graph.output_names(), opset)
    written_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset or 0)
    _add_metadata(model, metadata(state, checkpoint, graph, dynamic, written_opset))
    with atomic_write(out, "wb") as handle:
        handle.write(model.SerializeToString())
    seconds = time.perf_counter() - start
    console.print(f"export: wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {seconds:.1f} s", markup=False)
    summary = {"out": str(out), "opset": written_opset, "dynamic": dynamic, "scales": list(graph.scales),
               "outputs": graph.output_names(), "seconds": round(seconds, 1)}  # fmt: skip
    if verify:
        console.print("verify: the file in onnxruntime against PyTorch on random odd-sized images...", markup=False)
        with console.status("verifying in onnxruntime"):
            summary["verify"] = verify_export(out, graph, None if dynamic else static_size)
    Console(highlight=False, soft_wrap=True).print(_summary_line(summary), markup=False)
    return summary


def verify_export(path: Path, graph: Any, size: tuple[int, int] | None) -> dict[str, Any] | str:
    """Max |probs difference| and argmax agreement, onnxruntime vs PyTorch, on odd-sized random images."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return f"skipped: onnxruntime is not installed ({INSTALL_HINT})"

    session = OnnxSession(path)
    sizes = [size] if size is not None else [(67, 93), (33, 17)]
    worst, agree = 0.0, []
    for i, (h, w) in enumerate(sizes):
        image = np.random.default_rng(i).integers(0, 256, (1, h, w, 3), dtype=np.uint8)
        with torch.no_grad():
            expected = graph(torch.from_numpy(image))[0].numpy()
        probs = session.run(image)["probs"]
        worst = max(worst, float(np.abs(probs - expected).max()))
        agree.append(float((probs.argmax(1) == expected.argmax(1)).mean()))
    return {"sizes": [list(s) for s in sizes], "max_abs_diff": worst, "argmax_agreement": min(agree)}


def _summary_line(summary: dict[str, Any]) -> str:
    line = (
        f"wrote {summary['out']}: opset {summary['opset']}, {'dynamic' if summary['dynamic'] else 'static'} size, "
        f"scales {summary['scales']}, outputs {', '.join(summary['outputs'])} ({summary['seconds']} s)"
    )
    check = summary.get("verify")
    if isinstance(check, dict):
        line += (
            f"; onnxruntime vs PyTorch on {len(check['sizes'])} image(s): max |probs diff| "
            f"{check['max_abs_diff']:.1e}, argmax agreement {100 * check['argmax_agreement']:.2f}%"
        )
    elif check:
        line += f"; check {check}"
    return line
