"""The ``msattn`` command line: thin Typer commands that call plain functions.

Heavy imports (torch, numpy, PIL) happen inside the command bodies so that
``msattn --help`` is instant. Every :class:`msattn.errors.MsattnError` is turned
into one line on stderr and its exit code by :func:`main`; ``--debug`` (or
``MSATTN_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from msattn import __version__
from msattn.cli_data import register as register_data_commands


class _PlainHelp:
    """Help in the usual Unix form: flags without a type (``--resume``, not ``--resume <bool>``) and
    arguments as ``RECIPE`` / ``INPUTS...`` in the usage line (not ``{recipe}``)."""

    def get_params(self, ctx: typer.Context) -> list:  # type: ignore[override]
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""  # Typer shows the metavar instead of "<bool>"
        return params

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if getattr(self, "options_metavar", None) else []  # type: ignore[attr-defined]
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = (param.metavar or param.name or "").upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


class _Group(_PlainHelp, typer.core.TyperGroup):
    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return typer.core.TyperGroup.collect_usage_pieces(self, ctx)


class _Command(_PlainHelp, typer.core.TyperCommand):
    pass


app = typer.Typer(
    name="msattn",
    help="Scale-aware semantic segmentation: DeepLab-LargeFOV with attention to scale.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_Group,
)
prepare_app = typer.Typer(
    help="Turn original dataset archives into training-ready dataset folders.", no_args_is_help=True, cls=_Group
)
app.add_typer(prepare_app, name="prepare-data")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"msattn {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    max_pixels: Annotated[
        Optional[int],
        typer.Option(
            "--max-pixels",
            min=0,
            help="Refuse images with more pixels (decompression bombs; 0: no limit; default 100,000,000; "
            "env MSATTN_MAX_PIXELS). Recipes use data.max_pixels.",
        ),
    ] = None,
) -> None:
    """msattn: prepare data, train, evaluate, predict and refine with a dense CRF."""
    if debug:
        os.environ["MSATTN_DEBUG"] = "1"
    if max_pixels is not None:
        os.environ["MSATTN_MAX_PIXELS"] = str(max_pixels)  # read by msattn.io, inherited by worker processes


# ----------------------------------------------------------------------------- prepare-data

Workers = Annotated[int, typer.Option("--workers", "-j", min=0, help="Parallel worker processes (0: in-process).")]
# issue 18: CUDA graphs over size buckets for evaluate and predict (msattn.engine.graphs)
CompileGraphs = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="CUDA: run the whole multi-scale forward as one captured CUDA graph per batch shape, images padded "
        "to size buckets (--no-compile: eager, each image padded to its own next 8k+1 side). Ignored on CPU.",
    ),
]
Bucket = Annotated[
    Optional[int],
    typer.Option(min=0, help="With CUDA graphs: pad sides up to multiples of N pixels + 1 (a multiple of 8; "
                 "default 64; 0: the next 8k+1 side)."),
]


@prepare_app.command(cls=_Command, name="person-part")
def prepare_person_part(
    source: Annotated[Path, typer.Option(help="Folder with Annotations_Part/*.mat and JPEGImages/ (VOC 2010).")],
    out: Annotated[Path, typer.Option(help="Output dataset folder.")],
    workers: Workers = 2,
) -> None:
    """PASCAL-Person-Part (6 parts + background) from the Pascal-Part annotations."""
    from msattn.data.prepare.person_part import prepare_person_part as run

    run(source=source, out=out, workers=workers)


@prepare_app.command(cls=_Command, name="voc")
def prepare_voc(
    voc: Annotated[Path, typer.Option(help="VOC2012 folder (JPEGImages/, SegmentationClass/).")],
    out: Annotated[Path, typer.Option(help="Output dataset folder.")],
    sbd: Annotated[Optional[Path], typer.Option(help="SBD folder (cls/*.mat); omit for VOC train only.")] = None,
    workers: Workers = 2,
) -> None:
    """PASCAL VOC 2012 + SBD: train_aug (10,582) and val (1,449)."""
    from msattn.data.prepare.voc import prepare_voc as run

    run(voc=voc, sbd=sbd, out=out, workers=workers)


@prepare_app.command(cls=_Command, name="coco")
def prepare_coco(
    coco: Annotated[Path, typer.Option(help="COCO 2014 folder (annotations/, train2014/, val2014/).")],
    out: Annotated[Path, typer.Option(help="Output dataset folder.")],
    train_size: Annotated[int, typer.Option(min=1, help="Training images drawn from train2014.")] = 10000,
    val_size: Annotated[int, typer.Option(min=1, help="Validation images drawn from val2014.")] = 1500,
    seed: Annotated[int, typer.Option(help="Seed of the subset draw.")] = 0,
    workers: Workers = 2,
) -> None:
    """A seeded subset of COCO 2014 (80 classes + background)."""
    from msattn.data.prepare.coco import prepare_coco as run

    run(coco=coco, out=out, train_size=train_size, val_size=val_size, seed=seed, workers=workers)


@prepare_app.command(cls=_Command, name="demo")
def prepare_demo(
    out: Annotated[Path, typer.Option(help="Output dataset folder.")],
    num_train: Annotated[int, typer.Option(min=1, help="Training images.")] = 240,
    num_val: Annotated[int, typer.Option(min=1, help="Validation images.")] = 60,
    image_size: Annotated[int, typer.Option(min=32, help="Side of the square images.")] = 96,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    workers: Workers = 2,
) -> None:
    """A synthetic dataset where scale matters (figures with parts at sizes spanning 8x)."""
    from msattn.data.prepare.demo import prepare_demo as run

    run(out=out, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed, workers=workers)


# ----------------------------------------------------------------------------- weights


@app.command(cls=_Command, name="convert-weights")
def convert_weights(
    caffemodel: Annotated[Path, typer.Argument(help="DeepLab's init.caffemodel (or another VGG-16 LargeFOV caffemodel).")],
    out: Annotated[Path, typer.Option(help="Output file (.pt) for model.pretrained.")],
) -> None:
    """Convert Caffe weights to msattn's format (no Caffe needed); records the Caffe input convention."""
    from msattn.models.caffe import convert_weights_command

    convert_weights_command(caffemodel, out)


# ----------------------------------------------------------------------------- train / evaluate

Device = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda when available).")]
Tile = Annotated[
    Optional[int],
    typer.Option(help="Predict images larger than this in tiles of SIZE x SIZE pixels (8k+1, e.g. 513 or 1025); "
                 "each tile runs the whole multi-scale model and the tiles are blended."),
]
Overlap = Annotated[
    Optional[int], typer.Option(help="Pixels shared by neighbouring tiles (default: a quarter of the tile).")
]
MaxMemory = Annotated[
    Optional[str],
    typer.Option(help="Memory budget, e.g. 4GB: images whose whole-image prediction would need more are tiled "
                 "(default: 80% of free GPU memory, or 50% of available RAM on CPU)."),
]


def _tiling(tile: Optional[int], overlap: Optional[int], max_memory: Optional[str]):  # noqa: ANN202
    from msattn.tiling import TilingOptions, parse_memory

    budget = parse_memory(max_memory) if max_memory is not None else None
    return TilingOptions(tile=tile, overlap=overlap, max_memory=budget)


@app.command(cls=_Command)
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file, e.g. recipes/voc.toml.")],
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a recipe key: section.key=value (repeatable).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default: runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from <out>/last.pt if it exists.")] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="Start afresh in a run folder that holds another run (its files move to "
                     "<out>/replaced-<date>-<time>/)."),
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Validate the recipe and print the resolved config.")] = False,
    device: Device = None,
) -> None:
    """Train a model from a recipe (single process, or DDP under torchrun)."""
    from msattn.engine.train import train_from_recipe

    train_from_recipe(recipe_path=recipe, overrides=set_ or [], out=out, resume=resume, dry_run=dry_run, device=device,
                      overwrite=overwrite)


@app.command(cls=_Command)
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint (.pt) written by msattn train.")],
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder (default: the checkpoint's).")] = None,
    split: Annotated[str, typer.Option(help="Split list in the dataset folder.")] = "val",
    scales: Annotated[
        Optional[list[float]], typer.Option("--scales", help="Test-time scales (default: the model's).")
    ] = None,
    flip: Annotated[bool, typer.Option(help="Average with the horizontally flipped image.")] = False,
    crf: Annotated[bool, typer.Option(help="Refine with the dense CRF before scoring.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics as JSON here.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate only the first N images.")] = None,
    batch_size: Annotated[
        Optional[int], typer.Option(min=1, help="Images per forward pass (default: the recipe's eval.batch_size).")
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option(min=0, help="Image-loading processes (default: the recipe's data.workers).")
    ] = None,
    amp: Annotated[bool, typer.Option(help="bf16 autocast on CUDA (--no-amp: fp32 scores).")] = True,
    pad_to: Annotated[
        Optional[int],
        typer.Option(help="Pad every image to this 8k+1 side (DeepLab's VOC protocol: 513; default: the recipe's "
                     "eval.pad_to, else the next 8k+1 side of each image)."),
    ] = None,
    compile_graphs: CompileGraphs = True,
    bucket: Bucket = None,
    tile: Tile = None,
    overlap: Overlap = None,
    max_memory: MaxMemory = None,
    device: Device = None,
) -> None:
    """Score a checkpoint: mIoU, pixel accuracy and per-class IoU."""
    from msattn.engine.evaluate import evaluate_checkpoint

    evaluate_checkpoint(
        checkpoint=checkpoint,
        data=data,
        split=split,
        scales=scales,
        flip=flip,
        crf=crf,
        json_path=json_path,
        limit=limit,
        device=device,
        amp=amp,
        batch_size=batch_size,
        workers=workers,
        pad_to=pad_to,
        compile_graphs=compile_graphs,
        bucket=bucket,
        tiling=_tiling(tile, overlap, max_memory),
    )


# ----------------------------------------------------------------------------- analyze


@app.command()
def analyze(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint (.pt) written by msattn train.")],
    split: Annotated[str, typer.Option(help="Split list in the dataset folder.")] = "val",
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder (default: the checkpoint's).")] = None,
    scales: Annotated[
        Optional[list[float]],
        typer.Option("--scales", help="Scales of the pass (default: the trained ones; attention models need those)."),
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
    """Per scale, class, object size and scale subset: what each scale contributes (report.json + index.html)."""
    from msattn.analysis import Settings, analyze_checkpoint
    from msattn.analysis.objects import DEFAULT_BINS

    settings = Settings(split=split, scales=tuple(scales) if scales else None, max_images=max_images,
                        bins=tuple(bins) if bins else DEFAULT_BINS, include_background=include_background, amp=amp,
                        pad_to=pad_to, gallery=gallery, batch_size=batch_size, workers=workers,
                        bench=str(bench) if bench is not None else None)
    analyze_checkpoint(checkpoint=checkpoint, out=out, data=data, json_path=json_path, settings=settings, device=device)


# ----------------------------------------------------------------------------- predict / crf


@app.command(cls=_Command)
def predict(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Image files, folders (every image format Pillow reads; not recursive) or .txt lists: one "
            "path per line, relative to the list's folder, or a bare id (a dataset's val.txt) looked up as "
            "<id>.jpg/.png/... there, in images/ beside the list, or in --images-dir.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="Checkpoint (.pt) written by msattn train (the torch backend).")
    ] = None,
    model: Annotated[
        Optional[Path], typer.Option(help="ONNX model written by msattn export (the onnxruntime backend).")
    ] = None,
    backend: Annotated[
        Optional[str],
        typer.Option(help="torch (runs --checkpoint) or onnxruntime (runs --model, needs msattn[export]); "
                     "default: the one the given file needs."),
    ] = None,
    save_probs: Annotated[bool, typer.Option(help="Also write <name>.npz with float16 probabilities.")] = False,
    save_attention: Annotated[bool, typer.Option(help="Write per-scale attention maps and a figure.")] = False,
    crf: Annotated[bool, typer.Option(help="Refine with the dense CRF.")] = False,
    scales: Annotated[Optional[list[float]], typer.Option("--scales", help="Scales (default: the model's).")] = None,
    batch_size: Annotated[
        Optional[int], typer.Option(min=1, help="Images per forward pass (default: 8 with CUDA graphs, else 1).")
    ] = None,
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA.")] = True,
    resume: Annotated[bool, typer.Option(help="Skip images whose outputs are all in --out already.")] = False,
    overlay: Annotated[
        bool, typer.Option(help="Write <name>_overlay.jpg (--no-overlay: label PNGs only, the VOC server's format).")
    ] = True,
    pad_to: Annotated[
        Optional[int], typer.Option(help="Pad every image to this 8k+1 side (default: the next 8k+1 side).")
    ] = None,
    images_dir: Annotated[
        Optional[Path], typer.Option(help="Resolve the lines of .txt lists (paths or bare ids) against this folder.")
    ] = None,
    compile_graphs: CompileGraphs = True,
    bucket: Bucket = None,
    tile: Tile = None,
    overlap: Overlap = None,
    max_memory: MaxMemory = None,
    device: Device = None,
) -> None:
    """Predict label maps (and attention maps) for images.

    The output folder must not be an input folder; files there that predict did not write are
    never written over. Ends with the file to open first.
    """
    from msattn.engine.predict import predict_images

    predict_images(
        inputs=inputs,
        checkpoint=checkpoint,
        out=out,
        save_probs=save_probs,
        save_attention=save_attention,
        crf=crf,
        scales=scales,
        batch_size=batch_size,
        amp=amp,
        device=device,
        resume=resume,
        overlay=overlay,
        pad_to=pad_to,
        images_dir=images_dir,
        compile_graphs=compile_graphs,
        bucket=bucket,
        model=model,
        backend=backend,
        tiling=_tiling(tile, overlap, max_memory),
    )


@app.command(cls=_Command, name="crf-refine")
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
    """Refine saved probabilities with the fully connected CRF."""
    from msattn.crf_folders import crf_refine_command

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


# ----------------------------------------------------------------------------- export


@app.command("export")
def export(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint (.pt) written by msattn train.")],
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
    """Export the whole multi-scale model (resizing, backbone, merge, upsampling) as one ONNX graph."""
    from msattn.export.onnx import export_checkpoint

    export_checkpoint(
        checkpoint=checkpoint, out=out, scales=scales, opset=opset, dynamic=dynamic, size=size, argmax=argmax,
        verify=verify,
    )  # fmt: skip


# ----------------------------------------------------------------------------- bench


@app.command(cls=_Command)
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
        typer.Option("--case", help="Only these cases: scales[:merge], e.g. 1 or 1,0.75,0.5:attention (repeatable)."),
    ] = None,
    workers: Annotated[str, typer.Option(help="train-e2e's loader workers: a number or auto.")] = "auto",
    image: Annotated[str, typer.Option(help="HEIGHTxWIDTH of the large image of --mode tiled.")] = "3000x4000",
    tile: Annotated[int, typer.Option(help="Tile side of --mode tiled (8k+1).")] = 1025,
) -> None:
    """Measure latency, throughput, memory and FLOPs across scale sets and merges (progress on stderr)."""
    from msattn.engine.bench import run_bench

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
    )


# users' own data: prepare-data coco-json | labelme | cvat | cityscapes | masks, and check-data
register_data_commands(app, prepare_app)


# ----------------------------------------------------------------------------- entry point


_ENV_OPTIONS = ("MSATTN_DEBUG", "MSATTN_MAX_PIXELS")  # set by root options; restored after each main() call


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning errors into one line and an exit code.

    msattn errors carry their own exit code (2: usage/input, 1: runtime). Errors from outside
    msattn that users cause (a file where a folder should be, no permission, a full disk, out of
    memory) become one line too. ``--debug`` (or ``MSATTN_DEBUG=1``) re-raises with the traceback.
    """
    args = sys.argv[1:] if argv is None else argv
    saved = {name: os.environ.get(name) for name in _ENV_OPTIONS}
    debug = "--debug" in args or os.environ.get("MSATTN_DEBUG") == "1"
    try:
        code, message = _run(args, debug)
    finally:
        for name, value in saved.items():  # an in-process caller (tests, notebooks) gets its environment back
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if message is not None:
        typer.echo(f"msattn: error: {message}", err=True)
    if code:
        sys.exit(code)


def _run(args: list[str], debug: bool) -> tuple[int, str | None]:
    """Run the app; returns (exit code, one-line error message or None)."""
    from msattn.errors import MsattnError

    try:
        from msattn.io import max_pixels_limit

        max_pixels_limit()  # a malformed MSATTN_MAX_PIXELS is a usage error before any work
        app(args=args, prog_name="msattn")
    except MsattnError as exc:
        if debug:
            raise
        return exc.exit_code, _one_line(exc)
    except KeyboardInterrupt:
        typer.echo("msattn: interrupted", err=True)
        return 130, None
    except OSError as exc:
        if debug:
            raise
        return _os_error(exc)
    except MemoryError:
        if debug:
            raise
        return 1, "out of memory: lower the batch size, the crop size, the number of scales or --workers"
    except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError; torch is not imported here
        if debug or type(exc).__name__ != "OutOfMemoryError":
            raise
        return 1, (
            "out of GPU memory: lower the batch size (train.micro_batch, --batch-size), the crop "
            "(data.crop_size) or the number of scales, or use mixed precision (train.amp, --amp)"
        )
    return 0, None


def _one_line(exc: BaseException) -> str:
    """The error's message on one line; for an error re-raised by a DataLoader worker, the original message."""
    text = str(exc).strip()
    if "Original Traceback" in text:  # torch's ExceptionWrapper: "Caught X in DataLoader worker...\n<traceback>"
        last = text.splitlines()[-1]
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        text = last[len(prefix) :] if last.startswith(prefix) else last.split(": ", 1)[-1]
    return " ".join(text.splitlines())


def _os_error(exc: OSError) -> tuple[int, str]:
    """An OSError from outside msattn's own checks as (exit code, message naming the file)."""
    import errno

    where = f"{exc.filename}: " if exc.filename else ""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return 1, f"{where}no space left on device; free disk space and retry (finished files are kept)"
    if isinstance(exc, (FileExistsError, NotADirectoryError, IsADirectoryError, FileNotFoundError)):
        return 2, f"{where}{reason}"
    return 1, f"{where}{reason}"


if __name__ == "__main__":
    main()
