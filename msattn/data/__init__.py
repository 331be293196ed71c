"""Dataset folders: preparation (``msattn.data.prepare``), loading and augmentation.

Import names from the module that defines them (``msattn.data.datasets``, ``msattn.data.transforms``,
...). ``DatasetInfo``, ``read_dataset_info``, ``SegmentationFolder`` and ``pad_collate`` are still
reachable here, lazily, for the call sites in ``msattn/engine`` and ``msattn/analysis`` that have not
moved to ``msattn.data.datasets`` yet (issue 22); they go when those do. Lazily, because importing
``msattn.data.datasets`` imports torch (~1.5 s), which ``msattn.data.prepare`` and its worker
processes never need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["DatasetInfo", "SegmentationFolder", "pad_collate", "read_dataset_info"]

if TYPE_CHECKING:
    from msattn.data.datasets import DatasetInfo, SegmentationFolder, pad_collate, read_dataset_info


def __getattr__(name: str) -> Any:
    if name in __all__:
        from msattn.data import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'msattn.data' has no attribute {name!r}")
