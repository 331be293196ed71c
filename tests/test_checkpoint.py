"""Checkpoints: round trip, safe loading and clear errors."""

from __future__ import annotations

import pytest
import torch

from msattn.errors import CheckpointError
from msattn.models.scale import build_model
from msattn.runtime.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint

DATASET = {"name": "toy", "classes": ["bg", "a", "b"], "palette": [[0, 0, 0], [128, 0, 0], [0, 128, 0]],
           "ignore_index": 255, "mean": [0.5] * 3, "std": [0.25] * 3}  # fmt: skip


def test_round_trip_rebuilds_an_identical_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(3, (1.0, 0.5), "attention", width=0.0625)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, make_checkpoint(model, DATASET, config={"train": {"seed": 1}}, iteration=7))
    state = load_checkpoint(path)
    assert state["iteration"] == 7 and state["dataset"]["classes"] == ["bg", "a", "b"]
    clone = model_from_checkpoint(state)
    assert not clone.training and clone.model_args == model.model_args
    x = torch.randn(1, 3, 24, 24)
    torch.testing.assert_close(clone(x)["out"], model.eval()(x)["out"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    model = build_model(3, width=0.0625)
    path = tmp_path / "last.pt"
    save_checkpoint(path, make_checkpoint(model, DATASET, iteration=1))

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(Exception, match="no space left"):
        save_checkpoint(path, make_checkpoint(model, DATASET, iteration=2))
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "not a loadable"),
        (b"garbage bytes", "not a loadable"),
        ("pickled", "pickled Python objects"),
        ("foreign", "another tool"),
        ("future", "newer than this msattn"),
    ],
)
def test_bad_checkpoints_give_one_clear_error(tmp_path, payload, message) -> None:
    path = tmp_path / "bad.pt"
    if payload == "pickled":
        torch.save({"format": "msattn-checkpoint", "evil": Evil()}, path)
    elif payload == "foreign":
        torch.save({"state_dict": {}}, path)
    elif payload == "future":
        torch.save({"format": "msattn-checkpoint", "format_version": 99}, path)
    else:
        path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_mismatched_weights_are_reported(tmp_path) -> None:
    state = make_checkpoint(build_model(3, width=0.0625), DATASET)
    state["model_args"]["num_classes"] = 4
    with pytest.raises(CheckpointError, match="do not match"):
        model_from_checkpoint(state)
