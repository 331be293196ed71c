"""The ``msattn`` command line: thin Typer commands that call plain functions.

This module holds the app, its root options, the core commands (``train``, ``evaluate``,
``predict``) and the entry point; the other commands live in :mod:`msattn.cli.tools` and
:mod:`msattn.cli.data`, the shared option types in :mod:`msattn.cli.common`.

Each command imports what it runs inside its body, not at the top of the file: the
implementations import torch, and ``msattn --help`` then takes 1.7 s instead of 0.2 s (measured
with CPU torch 2.13 on 2 cores). This is the one place msattn imports its own modules lazily
(``tests/test_architecture.py`` allows it for ``msattn.cli`` alone). Every :class:`msattn.errors.MsattnError` is turned
into one line on stderr and its exit code by :func:`main`; ``--debug`` (or
``MSATTN_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from msattn import __version__
from msattn.cli import tools as cli_tools
from msattn.cli.common import (
    Bucket,
    Checkpoint,
    CompileGraphs,
    Data,
    Device,
    MaxMemory,
    Overlap,
    PlainHelpCommand,
    PlainHelpGroup,
    Split,
    Tile,
    inference_options,
)
from msattn.cli.data import register as register_data_commands
from msattn.cli.recipes import recipes_app
from msattn.errors import MsattnError
from msattn.io import max_pixels_limit

app = typer.Typer(
    name="msattn",
    help="Scale-aware semantic segmentation: DeepLab-LargeFOV with attention to scale.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    cls=PlainHelpGroup,
)
prepare_app = typer.Typer(
    help="Turn dataset archives into training-ready folders.", no_args_is_help=True,
    rich_markup_mode=None, cls=PlainHelpGroup,
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


# ----------------------------------------------------------------------------- train / evaluate / predict


def train(
    recipe: Annotated[
        str, typer.Argument(help="Recipe TOML file (recipes/voc.toml), or the name of a bundled recipe (demo; "
                            "msattn recipes lists them). A file wins over a bundled recipe of the same name.")
    ],
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
    """Train a model from a recipe.

    One process, or DDP under torchrun.
    """
    from msattn.train.loop import train_from_recipe  # here, not at the top: see the module docstring

    train_from_recipe(recipe_path=recipe, overrides=set_ or [], out=out, resume=resume, dry_run=dry_run, device=device,
                      overwrite=overwrite)


def evaluate(
    checkpoint: Checkpoint,
    data: Data = None,
    split: Split = "val",
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
    """Score a checkpoint: mIoU and per-class IoU.

    Also the pixel accuracy and the speed.
    """
    from msattn.infer.evaluate import evaluate_checkpoint  # here, not at the top: see the module docstring

    options = inference_options(scales, flip, amp, pad_to, batch_size, compile_graphs, bucket, device,
                                tile, overlap, max_memory)  # fmt: skip
    evaluate_checkpoint(checkpoint, options, data=data, split=split, crf=crf, json_path=json_path, limit=limit,
                        workers=workers)  # fmt: skip


# predict's options (the command below reads as a list of them)
PredictInputs = Annotated[
    list[Path],
    typer.Argument(
        help="Image files, folders (every image format Pillow reads; not recursive) or .txt lists: one "
        "path per line, relative to the list's folder, or a bare id (a dataset's val.txt) looked up as "
        "<id>.jpg, <id>.png (any image format) there, in images/ beside the list, or in --images-dir.",
        show_default=False,
    ),
]
PredictCheckpoint = Annotated[
    Optional[Path], typer.Option(help="Checkpoint (.pt) written by msattn train (the torch backend).")
]
PredictModel = Annotated[
    Optional[Path], typer.Option(help="ONNX model written by msattn export (the onnxruntime backend).")
]
Backend = Annotated[
    Optional[str],
    typer.Option(help="torch (runs --checkpoint) or onnxruntime (runs --model, needs msattn[export]); "
                 "default: the one the given file needs."),
]
PredictBatchSize = Annotated[
    Optional[int], typer.Option(min=1, help="Images per forward pass (default: 8 with CUDA graphs, else 1).")
]
Overlay = Annotated[
    bool, typer.Option(help="Write <name>_overlay.jpg (--no-overlay: label PNGs only, the VOC server's format).")
]
PredictPadTo = Annotated[
    Optional[int], typer.Option(help="Pad every image to this 8k+1 side (default: the next 8k+1 side).")
]
ImagesDir = Annotated[
    Optional[Path], typer.Option(help="Resolve the lines of .txt lists (paths or bare ids) against this folder.")
]


def predict(
    inputs: PredictInputs,
    out: Annotated[Path, typer.Option(help="Output folder.")],
    checkpoint: PredictCheckpoint = None,
    model: PredictModel = None,
    backend: Backend = None,
    save_probs: Annotated[bool, typer.Option(help="Also write <name>.npz with float16 probabilities.")] = False,
    save_attention: Annotated[bool, typer.Option(help="Write per-scale attention maps and a figure.")] = False,
    crf: Annotated[bool, typer.Option(help="Refine with the dense CRF.")] = False,
    scales: Annotated[Optional[list[float]], typer.Option("--scales", help="Scales (default: the model's).")] = None,
    batch_size: PredictBatchSize = None,
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA.")] = True,
    resume: Annotated[bool, typer.Option(help="Skip images whose outputs are all in --out already.")] = False,
    overlay: Overlay = True,
    pad_to: PredictPadTo = None,
    images_dir: ImagesDir = None,
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
    from msattn.infer.files import Outputs  # here, not at the top: see the module docstring
    from msattn.infer.predict import predict_images

    options = inference_options(scales, False, amp, pad_to, batch_size, compile_graphs, bucket, device,
                                tile, overlap, max_memory)  # fmt: skip
    predict_images(
        inputs, out, options, checkpoint=checkpoint, model=model, backend=backend, crf=crf, resume=resume,
        outputs=Outputs(save_probs=save_probs, save_attention=save_attention, overlay=overlay), images_dir=images_dir,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the commands, in --help's order

app.command(cls=PlainHelpCommand, name="convert-weights")(cli_tools.convert_weights)
app.command(cls=PlainHelpCommand)(train)
app.command(cls=PlainHelpCommand)(evaluate)
app.command(cls=PlainHelpCommand)(cli_tools.analyze)
app.command(cls=PlainHelpCommand)(predict)
app.command(cls=PlainHelpCommand, name="crf-refine")(cli_tools.crf_refine)
app.command(cls=PlainHelpCommand, name="export")(cli_tools.export)
app.command(cls=PlainHelpCommand)(cli_tools.bench)
app.add_typer(recipes_app, name="recipes")  # list, show, copy the bundled recipes
# the prepare-data group (the paper's datasets, the demo, users' own data) and check-data
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
    try:
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
    where = f"{exc.filename}: " if exc.filename else ""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return 1, f"{where}no space left on device; free disk space and retry (finished files are kept)"
    if isinstance(exc, (FileExistsError, NotADirectoryError, IsADirectoryError, FileNotFoundError)):
        return 2, f"{where}{reason}"
    return 1, f"{where}{reason}"

