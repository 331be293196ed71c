"""Dataset folders: preparation (``msattn.data.prepare``), loading and augmentation.

``DatasetInfo``, ``read_dataset_info``, ``SegmentationFolder`` and ``pad_collate`` are imported lazily
so that ``msattn.data.prepare`` (and ``msattn --help``) does not pay for importing torch.
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
