"""Pieces shared by the command modules (:mod:`msattn.cli.app`, :mod:`msattn.cli.tools`, :mod:`msattn.cli.data`).

The help formatting of the app's groups and commands, and the ``Annotated`` option types that
several commands declare alike. Nothing heavy is imported here: ``msattn --help`` stays instant.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

#: what an option's value is called in help, by its Python type (Typer would print ``<int range>``, ``<list[int]>``)
_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


def _metavar(param: Any) -> str | None:
    """``INT``, ``FLOAT``, ``TEXT`` or ``PATH`` for an option's value (a list's items), None when unknown."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)  # Typer >= 0.25
    if annotation is None:  # older Typer: click's own parameter type
        name = getattr(getattr(param, "type", None), "name", "")
        return {"integer": "INT", "integer range": "INT", "float": "FLOAT", "float range": "FLOAT", "text": "TEXT",
                "path": "PATH"}.get(name)  # fmt: skip
    for arg in (*typing.get_args(annotation), annotation):  # Optional[int], list[float]: the item's type
        if arg in _METAVARS:
            return _METAVARS[arg]
    return None


class _PlainHelp:
    """Help in the usual Unix form, whole at 80 columns: flags without a type (``--resume``, not
    ``--resume <bool>``), values by type (``--size INT``, not ``<list[int]>``), and arguments as
    ``RECIPE`` / ``INPUTS...`` in the usage line (not ``{recipe}``). Every command and group uses it."""

    def get_params(self, ctx: typer.Context) -> list:  # type: ignore[override]
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""  # Typer shows the metavar instead of "<bool>"
            elif param.param_type_name == "option" and param.metavar is None:
                param.metavar = _metavar(param)
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


class PlainHelpGroup(_PlainHelp, typer.core.TyperGroup):
    """The app and its command groups (the group's own usage line)."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return typer.core.TyperGroup.collect_usage_pieces(self, ctx)


class PlainHelpCommand(_PlainHelp, typer.core.TyperCommand):
    """A command with plain help."""


# ----------------------------------------------------------------------------- shared option types

Workers = Annotated[int, typer.Option("--workers", "-j", min=0, help="Parallel worker processes (0: in-process).")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda when available).")]
Checkpoint = Annotated[Path, typer.Option(help="Checkpoint (.pt) written by msattn train.")]
Data = Annotated[Optional[Path], typer.Option(help="Dataset folder (default: the checkpoint's).")]
Split = Annotated[str, typer.Option(help="Split list in the dataset folder.")]

# issue 18: CUDA graphs over size buckets for evaluate and predict (msattn.infer.graphs)
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

# tiling (msattn.tiling) for evaluate and predict
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


def inference_options(
    scales: Optional[list[float]], flip: bool, amp: bool, pad_to: Optional[int], batch_size: Optional[int],
    compile_graphs: bool, bucket: Optional[int], device: Optional[str], tile: Optional[int], overlap: Optional[int],
    max_memory: Optional[str],
) -> Any:
    """evaluate's and predict's flags as one :class:`msattn.infer.options.InferenceOptions`."""
    from msattn.infer.options import InferenceOptions  # here, not at the top: see msattn.cli.app's docstring
    from msattn.sizes import parse_memory
    from msattn.tiling.run import TilingOptions

    budget = parse_memory(max_memory) if max_memory is not None else None
    return InferenceOptions(
        scales=tuple(scales) if scales else None, flip=flip, amp="bf16" if amp else "off", pad_to=pad_to,
        batch_size=batch_size, compile_graphs=compile_graphs, bucket=bucket, device=device,
        tiling=TilingOptions(tile=tile, overlap=overlap, max_memory=budget),
    )  # fmt: skip
