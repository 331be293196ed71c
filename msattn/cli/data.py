"""Data commands: ``prepare-data person-part|voc|coco|demo`` (the paper's datasets and the demo),
``prepare-data coco-json|labelme|cvat|cityscapes|masks`` (users' own data) and ``check-data``.

Thin Typer commands registered on the app of :mod:`msattn.cli.app` by :func:`register`; each calls one
plain function. Heavy imports stay inside the command bodies so that ``msattn --help`` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from msattn.cli.common import PlainHelpCommand, Workers

Out = Annotated[Path, typer.Option(help="Output dataset folder (outside the inputs).")]
ValFraction = Annotated[
    float, typer.Option(help="Share of images drawn for val when the source gives no split (0 < F < 1).")
]
Seed = Annotated[int, typer.Option(help="Seed of the train/val draw.")]


# ----------------------------------------------------------------------------- the paper's datasets and the demo


def prepare_person_part(
    source: Annotated[Path, typer.Option(help="Folder with Annotations_Part/*.mat and JPEGImages/ (VOC 2010).")],
    out: Annotated[Path, typer.Option(help="Output dataset folder.")],
    workers: Workers = 2,
) -> None:
    """PASCAL-Person-Part (6 parts + background).

    Made from the Pascal-Part annotations.
    """
    from msattn.data.prepare.person_part import prepare_person_part as run

    run(source=source, out=out, workers=workers)


def prepare_voc(
    voc: Annotated[Path, typer.Option(help="VOC2012 folder (JPEGImages/, SegmentationClass/).")],
    out: Annotated[Path, typer.Option(help="Output dataset folder.")],
    sbd: Annotated[Optional[Path], typer.Option(help="SBD folder (cls/*.mat); omit for VOC train only.")] = None,
    workers: Workers = 2,
) -> None:
    """PASCAL VOC 2012 + SBD: train_aug (10,582) and val (1,449)."""
    from msattn.data.prepare.voc import prepare_voc as run

    run(voc=voc, sbd=sbd, out=out, workers=workers)


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


def prepare_demo(
    out: Annotated[Path, typer.Option(help="Output dataset folder.")],
    num_train: Annotated[int, typer.Option(min=1, help="Training images.")] = 240,
    num_val: Annotated[int, typer.Option(min=1, help="Validation images.")] = 60,
    image_size: Annotated[int, typer.Option(min=32, help="Side of the square images.")] = 96,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    workers: Workers = 2,
    style: Annotated[
        str,
        typer.Option(help="figures: coloured parts, heights 11-95% of the image; silhouettes: one colour per "
                     "figure, heights up to 3x the image (where attention picks the coarser input for large figures)."),
    ] = "figures",
) -> None:
    """A synthetic dataset where scale matters.

    Figures with parts at sizes spanning 8x.
    """
    from msattn.data.prepare.demo import prepare_demo as run

    run(out=out, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed, workers=workers, style=style)


# ----------------------------------------------------------------------------- users' own data


def prepare_coco_json(
    annotations: Annotated[Path, typer.Option(help="COCO instances JSON (train, or all images).")],
    images: Annotated[Path, typer.Option(help="Folder of the images its file_name entries name.")],
    out: Out,
    val_annotations: Annotated[Optional[Path], typer.Option(help="COCO JSON of the val images.")] = None,
    val_images: Annotated[Optional[Path], typer.Option(help="Folder of the val images (default: --images).")] = None,
    crowd: Annotated[str, typer.Option(help="Crowd regions (iscrowd=1): 'ignore' (255) or 'class'.")] = "ignore",
    val_fraction: ValFraction = 0.1,
    seed: Seed = 0,
    workers: Workers = 2,
) -> None:
    """Any COCO-format instances file (polygons, RLE).

    Categories by id -> classes 1..N.
    """
    from msattn.data.prepare.coco_json import prepare_coco_json as run

    run(annotations=annotations, images=images, out=out, val_annotations=val_annotations, val_images=val_images,
        crowd=crowd, val_fraction=val_fraction, seed=seed, workers=workers)  # fmt: skip


def prepare_labelme(
    source: Annotated[Path, typer.Option(help="Folder of LabelMe .json files (searched recursively).")],
    out: Out,
    labels: Annotated[
        Optional[Path], typer.Option(help="labels.txt: class names, one per line (default: first-seen order).")
    ] = None,
    val_fraction: ValFraction = 0.1,
    seed: Seed = 0,
    workers: Workers = 2,
) -> None:
    """LabelMe JSON files (polygons, rectangles, masks...).

    Polygons, rectangles, circles and masks; lines and points are ignored.
    """
    from msattn.data.prepare.labelme import prepare_labelme as run

    run(source=source, out=out, labels=labels, val_fraction=val_fraction, seed=seed, workers=workers)


def prepare_cvat(
    source: Annotated[Path, typer.Option(help="CVAT export: folder with annotations.xml or labelmap.txt.")],
    out: Out,
    images: Annotated[
        Optional[Path], typer.Option(help="Image folder (default: images/ or JPEGImages/ of the export).")
    ] = None,
    val_fraction: ValFraction = 0.1,
    seed: Seed = 0,
    workers: Workers = 2,
) -> None:
    """CVAT exports: XML or segmentation masks.

    'CVAT for images 1.1' XML or 'Segmentation mask 1.1'.
    """
    from msattn.data.prepare.cvat import prepare_cvat as run

    run(source=source, out=out, images=images, val_fraction=val_fraction, seed=seed, workers=workers)


def prepare_cityscapes(
    source: Annotated[Path, typer.Option(help="Folder with leftImg8bit/ and gtFine/.")],
    out: Out,
    workers: Workers = 2,
) -> None:
    """Cityscapes fine annotations (19 train ids).

    Other ids become 255 (ignored); the official train and val, whichever are present.
    """
    from msattn.data.prepare.cityscapes import prepare_cityscapes as run

    run(source=source, out=out, workers=workers)


def prepare_masks(
    images: Annotated[Path, typer.Option(help="Image folder (flat, or with train/ and val/ sub-folders).")],
    masks: Annotated[Path, typer.Option(help="Mask folder, same layout; masks match images by name stem.")],
    out: Out,
    classes: Annotated[
        Optional[Path], typer.Option(help="classes.json: names, mask values and/or RGB colours of the classes.")
    ] = None,
    ignore_value: Annotated[int, typer.Option(help="Mask value meaning 'ignore' (-1: none).")] = 255,
    mask_suffix: Annotated[str, typer.Option(help="Mask name = image stem + this + extension (e.g. _mask).")] = "",
    val_fraction: ValFraction = 0.1,
    seed: Seed = 0,
    workers: Workers = 2,
) -> None:
    """Image/mask pairs: index masks or RGB colour masks.

    Index masks may be 8 or 16 bits, grey or palette.
    """
    from msattn.data.prepare.masks import prepare_masks as run

    run(images=images, masks=masks, out=out, classes=classes, ignore_value=ignore_value, mask_suffix=mask_suffix,
        val_fraction=val_fraction, seed=seed, workers=workers)  # fmt: skip


def check_data(
    root: Annotated[Path, typer.Argument(help="Dataset folder (images/, labels/, train.txt, val.txt, dataset.json).")],
    full: Annotated[bool, typer.Option(help="Also decode every image fully and compare images by pixels.")] = False,
    report: Annotated[
        Optional[Path], typer.Option(help="Write index.html (plots) and report.json into this folder.")
    ] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here.")] = None,
    split: Annotated[
        Optional[list[str]], typer.Option("--split", help="Split list(s) to check (default: train, val, test).")
    ] = None,
    num_classes: Annotated[
        Optional[int], typer.Option(min=1, max=255, help="Class count to check against (default: dataset.json's).")
    ] = None,
    workers: Workers = 2,
) -> None:
    """Check a dataset folder before training.

    Exit 1 on errors, 0 with warnings.
    """
    from msattn.data.check_report import check_data_command

    check_data_command(root, full=full, report_dir=report, json_path=json_path, splits=split,
                       num_classes=num_classes, workers=workers)  # fmt: skip


def register(app: typer.Typer, prepare_app: typer.Typer) -> None:
    """Add these commands to the ``msattn`` app and its ``prepare-data`` group."""
    prepare_app.command(cls=PlainHelpCommand, name="person-part")(prepare_person_part)
    prepare_app.command(cls=PlainHelpCommand, name="voc")(prepare_voc)
    prepare_app.command(cls=PlainHelpCommand, name="coco")(prepare_coco)
    prepare_app.command(cls=PlainHelpCommand, name="demo")(prepare_demo)
    prepare_app.command(cls=PlainHelpCommand, name="coco-json")(prepare_coco_json)
    prepare_app.command(cls=PlainHelpCommand, name="labelme")(prepare_labelme)
    prepare_app.command(cls=PlainHelpCommand, name="cvat")(prepare_cvat)
    prepare_app.command(cls=PlainHelpCommand, name="cityscapes")(prepare_cityscapes)
    prepare_app.command(cls=PlainHelpCommand, name="masks")(prepare_masks)
    app.command(cls=PlainHelpCommand, name="check-data")(check_data)
