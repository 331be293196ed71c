"""One writer per folder (msattn.locks)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from msattn.locks import LOCK_NAME, OWNER_NAME, FolderBusyError, folder_lock


def _hold(folder: str, ready, release) -> None:
    with folder_lock(folder, "msattn train recipes/demo.toml"):
        ready.set()
        release.wait(30)


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path / "run"), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(FolderBusyError) as info:
            with folder_lock(tmp_path / "run", "msattn predict"):
                pass
        message = str(info.value)
        assert str(tmp_path / "run") in message and f"process {holder.pid}" in message
        assert "msattn train recipes/demo.toml" in message
    finally:
        release.set()
        holder.join(30)
    with folder_lock(tmp_path / "run", "msattn predict"):  # free again once the holder ended
        pass


def test_a_killed_holder_leaves_the_folder_unlocked(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path / "run"), ready, release))
    holder.start()
    assert ready.wait(60)
    holder.kill()
    holder.join(30)
    with folder_lock(tmp_path / "run", "msattn train"):
        assert (tmp_path / "run" / OWNER_NAME).is_file()


def test_a_failed_command_leaves_no_trace_in_a_folder_it_created(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path / "new", "msattn predict"):
            raise RuntimeError("bad checkpoint")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path / "old", "msattn predict"):
            raise RuntimeError("bad checkpoint")
    assert (tmp_path / "old").is_dir()  # a folder the user had is never removed
    with folder_lock(tmp_path / "ok", "msattn predict") as folder:
        (folder / "a.png").write_bytes(b"x")
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == sorted(["a.png", LOCK_NAME, OWNER_NAME])


def test_a_file_where_the_folder_should_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(Exception, match="not a folder"):
        with folder_lock(tmp_path / "f", "msattn predict"):
            pass
    assert (tmp_path / "f").read_text() == "x" and os.path.isfile(tmp_path / "f")
