"""One writer per folder: a lock that makes a second command writing the same folder stop at once.

Every command that writes a run folder, a dataset folder or an output folder holds
:func:`folder_lock` on it for its whole run. The lock is an OS file lock (``filelock``) on
``<folder>/.msattn.lock``: the operating system releases it when the process ends, however
it ends, so a killed run never leaves a folder locked. Beside it, ``.msattn.lock.json``
names the holder (command, process id, host, start time) for the message the second
command prints. Worker processes and DDP ranks of one command do not take the lock.

A command that fails leaves no lock files behind in a folder it created and wrote nothing
else into (the folder is removed too), so a failed first attempt leaves no trace.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from msattn.errors import UsageError

LOCK_NAME = ".msattn.lock"
OWNER_NAME = ".msattn.lock.json"


class FolderBusyError(UsageError):
    """Another msattn command is writing the folder."""


def _owner_text(folder: Path) -> str:
    try:
        owner = json.loads((folder / OWNER_NAME).read_text(encoding="utf-8"))
        return (
            f"{owner.get('command', 'another command')} (process {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}, since {owner.get('started', '?')})"
        )
    except (OSError, ValueError, AttributeError):
        return "another msattn command"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], command: str, enabled: bool = True) -> Iterator[Path]:
    """Hold the write lock of ``folder`` (created if missing) while the block runs.

    A second holder gets :class:`FolderBusyError` at once, naming the folder and the first
    holder. ``enabled=False`` (e.g. DDP ranks other than 0) does nothing.
    """
    folder = Path(folder)
    if not enabled:
        yield folder
        return
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}: exists and is not a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderBusyError(
            f"{folder}: another command is writing this folder: {_owner_text(folder)}; wait for it to finish "
            "or choose another output folder"
        ) from None
    ok = False
    try:
        owner = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        tmp = folder / f".tmp-{OWNER_NAME}.{os.getpid()}"
        tmp.write_text(json.dumps(owner), encoding="utf-8")
        os.replace(tmp, folder / OWNER_NAME)
        yield folder
        ok = True
    finally:
        lock.release()
        if not ok and created:
            _remove_if_only_locks(folder)


def _remove_if_only_locks(folder: Path) -> None:
    """Remove a folder this command created when it holds nothing but the lock files."""
    with contextlib.suppress(OSError):
        if {p.name for p in folder.iterdir()} <= {LOCK_NAME, OWNER_NAME}:
            for name in (LOCK_NAME, OWNER_NAME):
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()
