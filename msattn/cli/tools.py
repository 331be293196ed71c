"""Commands around the core ones: ``convert-weights``, ``analyze``, ``crf-refine``, ``export`` and ``bench``.

Thin Typer commands registered on the app of :mod:`msattn.cli.app` (which sets the order ``--help``
lists them in); each calls one plain function. Heavy imports stay inside the command bodies so
that ``msattn --help`` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from msattn.cli.common import Checkpoint, Data, Device, Split, Workers


def convert_weights(
    caffemodel: Annotated[
        Path,
        typer.Argument(help="A DeepLab caffemodel: VGG-16 LargeFOV (init.caffemodel) or DeepLab-v2 ResNet-101 "
                       "(ImageNet init or the released VOC / COCO models)."),
    ],
    out: Annotated[Path, typer.Option(help="Output file (.pt) for model.pretrained.")],
) -> None:
    """Convert DeepLab's Caffe weights to msattn's format.

    VGG-16 LargeFOV or DeepLab-v2 ResNet-101; no Caffe needed. The backbone
    and the Caffe input convention are recorded with the weights.
    """
    from msattn.models.caffe import convert_weights_command

    convert_weights_command(caffemodel, out)


def analyze(
    checkpoint: Checkpoint,
    split: Split = "val",
    data: Data = None,
    scales: Annotated[
        Optional[list[float]],
        typer.Option("--scales", help="Scales of the pass (default: the trained ones, a hierarchical model's "
                     "eval.scales; attention models need the trained ones)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Report folder (index.html, report.json, the resumable state).")] = Path(
        "report"
    ),
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write report.json here.")] = None,
    max_images: Annotated[Optional[int], typer.Option(min=1, help="Analyze only the first N images.")] = None,
    bins: Annotated[
        Optional[list[float]],
        typer.Option("--bins", help="Object size bin edges, area shares of the image (default 0.005 0.02 0.08 0.32)."),
    ] = None,
    gallery: Annotated[int, typer.Option(min=0, help="Images where merging gained (and lost) most, shown each.")] = 4,
    bench: Annotated[
        Optional[Path], typer.Option(help="msattn bench --json file: measured latency next to the FLOPs.")
    ] = None,
    include_background: Annotated[
        bool, typer.Option(help="Count background regions as objects in the size bins.")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass (same-size images).")] = 4,
    workers: Annotated[int, typer.Option(min=0, help="Image-loading processes.")] = 0,
    amp: Annotated[bool, typer.Option(help="bf16 autocast on CUDA (--no-amp: fp32).")] = True,
    pad_to: Annotated[Optional[int], typer.Option(help="Pad every image to this 8k+1 side (default: the recipe's).")] = None,
    device: Device = None,
) -> None:
    """What each scale contributes: a report.

    Per scale, class, object size and scale subset (report.json + index.html).
    """
    from msattn.analysis.objects import DEFAULT_BINS
    from msattn.analysis.run import Settings, analyze_checkpoint

    settings = Settings(split=split, scales=tuple(scales) if scales else None, max_images=max_images,
                        bins=tuple(bins) if bins else DEFAULT_BINS, include_background=include_background, amp=amp,
                        pad_to=pad_to, gallery=gallery, batch_size=batch_size, workers=workers,
                        bench=str(bench) if bench is not None else None)
    analyze_checkpoint(checkpoint=checkpoint, out=out, data=data, json_path=json_path, settings=settings, device=device)


def crf_refine(
    images: Annotated[Path, typer.Option(help="Folder of the original images.")],
    probs: Annotated[Path, typer.Option(help="Folder of <name>.npz from predict --save-probs.")],
    out: Annotated[Path, typer.Option(help="Output folder for refined label maps.")],
    bi_w: Annotated[Optional[float], typer.Option(help="Bilateral kernel weight (default 4).")] = None,
    bi_xy_std: Annotated[Optional[float], typer.Option(help="Bilateral spatial std (default 121).")] = None,
    bi_rgb_std: Annotated[Optional[float], typer.Option(help="Bilateral colour std (default 5).")] = None,
    pos_w: Annotated[Optional[float], typer.Option(help="Gaussian kernel weight (default 3).")] = None,
    pos_xy_std: Annotated[Optional[float], typer.Option(help="Gaussian spatial std (default 3).")] = None,
    iterations: Annotated[Optional[int], typer.Option(min=1, help="Mean-field iterations (default 10).")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="Take defaults from this recipe's [crf] section.")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Ground-truth label folder (for --search).")] = None,
    search: Annotated[bool, typer.Option(help="Grid-search bi_w, bi_xy_std, bi_rgb_std (those not given) against --labels.")] = False,
    workers: Workers = 2,
) -> None:
    """Refine saved probabilities with the dense CRF."""
    from msattn.crf.folders import crf_refine_command

    crf_refine_command(
        images=images,
        probs=probs,
        out=out,
        overrides={
            "bi_w": bi_w,
            "bi_xy_std": bi_xy_std,
            "bi_rgb_std": bi_rgb_std,
            "pos_w": pos_w,
            "pos_xy_std": pos_xy_std,
            "iterations": iterations,
        },
        recipe=recipe,
        labels=labels,
        search=search,
        workers=workers,
    )


def export(
    checkpoint: Checkpoint,
    out: Annotated[Path, typer.Option(help="Output ONNX file, e.g. model.onnx.")],
    scales: Annotated[
        Optional[list[float]], typer.Option("--scales", help="Scales built into the graph (default: the model's).")
    ] = None,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (18 or newer; default: the exporter's).")] = None,
    dynamic: Annotated[
        bool, typer.Option("--dynamic/--static", help="Any batch, height and width (default), or one fixed --size.")
    ] = True,
    size: Annotated[str, typer.Option(help="HEIGHTxWIDTH of the input for --static.")] = "513x513",
    argmax: Annotated[bool, typer.Option(help="Add a 'labels' output: the argmax, uint8 [N, H, W].")] = False,
    verify: Annotated[
        bool, typer.Option(help="Compare onnxruntime with PyTorch on random images after writing.")
    ] = True,
) -> None:
    """Export the multi-scale model as one ONNX graph.

    Resizing, backbone, merge and upsampling, all in the graph.
    """
    from msattn.export.onnx import export_checkpoint

    export_checkpoint(
        checkpoint=checkpoint, out=out, scales=scales, opset=opset, dynamic=dynamic, size=size, argmax=argmax,
        verify=verify,
    )  # fmt: skip


def bench(
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    size: Annotated[Optional[list[int]], typer.Option("--size", help="Input sides (repeatable).")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size.")] = 1,
    amp: Annotated[bool, typer.Option(help="bf16 autocast (CUDA only).")] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    channels_last: Annotated[bool, typer.Option(help="channels_last memory format.")] = False,
    width: Annotated[float, typer.Option(help="Channel width multiplier (1 = paper).")] = 1.0,
    iters: Annotated[int, typer.Option(min=1, help="Timed iterations per case.")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up iterations per case.")] = 2,
    modes: Annotated[
        Optional[list[str]], typer.Option("--mode", help="inference, train, data, train-e2e, tiled, onnx (repeatable).")
    ] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the records as JSON here.")] = None,
    graph: Annotated[
        Optional[bool],
        typer.Option("--graph/--no-graph", help="Inference as captured CUDA graphs (default: on for CUDA)."),
    ] = None,
    case: Annotated[
        Optional[list[str]],
        typer.Option("--case", help="Only these cases: scales[:merge], e.g. 1 or 2,1:attention (repeatable; "
                     "any scale set, every case given runs)."),
    ] = None,
    workers: Annotated[str, typer.Option(help="train-e2e's loader workers: a number or auto.")] = "auto",
    image: Annotated[str, typer.Option(help="HEIGHTxWIDTH of the large image of --mode tiled.")] = "3000x4000",
    tile: Annotated[int, typer.Option(help="Tile side of --mode tiled (8k+1).")] = 1025,
    backbone: Annotated[
        str,
        typer.Option(help="Network of every case: vgg16_largefov, resnet101, resnet50, efficientnet_lite0, timm:NAME."),
    ] = "vgg16_largefov",
) -> None:
    """Time and size the model across scale sets and merges.

    Latency, throughput, memory and FLOPs (progress on stderr).
    """
    from msattn.bench.run import run_bench

    run_bench(
        device=device,
        sizes=size or [321],
        batch=batch,
        amp=amp,
        compile_model=compile_,
        channels_last=channels_last,
        width=width,
        iters=iters,
        warmup=warmup,
        modes=modes or ["inference", "train"],
        json_path=json_path,
        graph=graph,
        cases=case,
        workers=workers,
        image=image,
        tile=tile,
        backbone=backbone,
    )
