"""Rules shared by the importers: safe ids, inputs kept apart from --out, seeded splits, geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from msattn.data.prepare.importing import (
    IdTable,
    check_out_separate,
    ellipse_mask,
    rectangle_mask,
    safe_id,
    split_by_fraction,
)  # fmt: skip
from msattn.errors import UsageError
from msattn.io import check_id


@pytest.mark.parametrize(
    ("name", "expected"),
    [("plain", "plain"), ("a/b", "a_b"), ("a\\b", "a_b"), ("..", "_"), ("x..y", "x_y"), (".hidden", "_hidden"),
     ("#1", "_1"), (" pad ", "pad"), ("tab\there", "tab_here"), ("", "_"), (".tmp-x", "_tmp-x"), ("日本", "日本")],
)  # fmt: skip
def test_safe_ids(name: str, expected: str) -> None:
    assert safe_id(name) == expected
    assert check_id(safe_id(name), "test") == expected


def test_id_collisions_are_problems_naming_both_sources() -> None:
    table = IdTable()
    assert table.add("a/b", "first.json") == "a_b"
    assert table.add("a_b", "second.json") is None
    (result,) = table.error_results()
    assert result.status == "error" and "second.json" in result.message and "first.json" in result.message


def test_out_must_stay_apart_from_inputs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for out in (src, tmp_path):
        with pytest.raises(UsageError, match="is or contains the input"):
            check_out_separate(out, src)
    with pytest.raises(UsageError, match="inside the input folder"):
        check_out_separate(src / "out", scanned=src)
    check_out_separate(src / "out", src / "ann.json")  # an output beside an input file is fine
    check_out_separate(tmp_path / "out", src)


def test_split_by_fraction_is_seeded_and_keeps_both_splits() -> None:
    ids = [f"i{n}" for n in range(7)]
    first = split_by_fraction(reversed(ids), 0.3, 0)
    assert first == split_by_fraction(ids, 0.3, 0) and list(first.values()).count("val") == 2
    assert list(split_by_fraction(ids[:2], 0.01, 0).values()).count("val") == 1
    assert split_by_fraction(["only"], 0.5, 0) == {"only": "train"}


def test_pixel_centre_rule() -> None:
    mask = rectangle_mask(2, 1, 5, 3, 6, 8)
    assert np.argwhere(mask).min(0).tolist() == [1, 2] and np.argwhere(mask).max(0).tolist() == [2, 4]
    circle = ellipse_mask(4, 4, 1, 1, 8, 8)
    assert circle.sum() == 4 and circle[3:5, 3:5].all()
