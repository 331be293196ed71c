"""Output folders that never lose a user's file and never keep a stale result.

Every file ``msattn predict`` and ``msattn crf-refine`` write carries a **mark** saying which
command made it, from which settings and from which input (a PNG text chunk, a JPEG comment,
an ``msattn_mark`` entry in an ``.npz``). The folder's ``.msattn-<command>.json`` keeps the
settings behind each mark, so a message can say what changed. With the marks:

- a file the command did not write (a user's ``x.png``, or another command's output) is never
  written over: :func:`plan_outputs` refuses before any work, naming it;
- an existing output is kept (resume) only when its mark matches the current settings and
  inputs; otherwise it is redone, and the note says which setting or input differs;
- a kill at any moment leaves each file complete (atomic writes) and self-describing.

:func:`refuse_inputs_in_out` and :func:`check_output_file` keep outputs away from inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from msattn.errors import UsageError
from msattn.io import write_json

MARK_KEY = "msattn"  # PNG text chunk key; the .npz entry is "msattn_mark"
NPZ_MARK = "msattn_mark"
SHOWN = 3  # files named in a refusal before "and N more"


# ----------------------------------------------------------------------------- marks


@dataclass(frozen=True)
class Mark:
    """What made one output file: the command, a key of its settings and a key of its inputs."""

    command: str
    settings: str
    inputs: str

    def text(self) -> str:
        return json.dumps({"by": f"msattn {self.command}", "settings": self.settings, "inputs": self.inputs})

    @staticmethod
    def parse(text: str | bytes | None) -> Mark | None:
        """The mark in ``text``, or None when it is not one."""
        try:
            data = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text or "")
            by = str(data["by"])
            if not by.startswith("msattn "):
                return None
            return Mark(by.removeprefix("msattn "), str(data["settings"]), str(data["inputs"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def settings_key(settings: Mapping[str, Any]) -> str:
    """A short stable key of a JSON-able settings dict."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_identity(path: Path) -> dict[str, Any]:
    """What identifies an input file's content cheaply: its absolute path, size and modification time."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def inputs_key(paths: Sequence[Path]) -> str:
    """A key of the identities of ``paths`` (missing files count as missing)."""
    parts = []
    for path in paths:
        try:
            parts.append(file_identity(Path(path)))
        except OSError:
            parts.append({"path": str(path), "missing": True})
    return settings_key({"inputs": parts})


def mark_params(path: Path, mark: Mark) -> dict[str, Any]:
    """Keyword arguments for :func:`msattn.io.save_image` that embed ``mark`` in a PNG or JPEG."""
    if path.suffix.lower() == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_text(MARK_KEY, mark.text())
        return {"pnginfo": info}
    return {"comment": mark.text().encode("utf-8")}


def read_mark(path: Path) -> Mark | None:
    """The mark of an existing output file, or None (not written by msattn, or unreadable)."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return Mark.parse(str(npz[NPZ_MARK])) if NPZ_MARK in npz.files else None
        with Image.open(path) as img:
            return Mark.parse(img.info.get(MARK_KEY) or img.info.get("comment"))
    except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
        return None


# ----------------------------------------------------------------------------- the folder's settings


def record_path(out: Path, command: str) -> Path:
    return out / f".msattn-{command}.json"


def read_settings(out: Path, command: str) -> dict[str, Any]:
    """key -> settings dict from ``.msattn-<command>.json`` ({} when absent or damaged)."""
    try:
        data = json.loads(record_path(out, command).read_text(encoding="utf-8"))
        table = data.get("settings") if isinstance(data, dict) else None
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}


def write_settings(out: Path, command: str, key: str, settings: Mapping[str, Any]) -> None:
    """Add ``key -> settings`` to ``.msattn-<command>.json`` (atomically; older keys are kept)."""
    table = read_settings(out, command)
    table[key] = dict(settings)
    write_json(record_path(out, command), {"format": "msattn-outputs", "command": f"msattn {command}",
                                           "settings": table})  # fmt: skip


def describe_change(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """'scales: [1.0, 0.5] -> [1.0]' for the keys that differ (or 'other settings' when unknown)."""
    if not isinstance(old, Mapping):
        return "other settings"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys[:4]) or "other settings"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


# ----------------------------------------------------------------------------- planning a run


@dataclass(frozen=True)
class Item:
    """One unit of work: the files it writes (names in the output folder) and the mark they carry."""

    files: tuple[str, ...]
    mark: Mark


@dataclass
class Plan:
    """Which items to (re)do and which are up to date, with notes saying why items are redone."""

    todo: list[int] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_outputs(
    out: Path, items: Sequence[Item], command: str, settings: Mapping[str, Any], keep_current: bool
) -> Plan:
    """Decide what to write into ``out``; refuse (UsageError, before any work) files msattn did not write.

    ``keep_current``: skip items whose files all exist with the current mark (resume); the
    others are redone, with a note per reason. Without it every item is redone.
    """
    plan = Plan()
    foreign: list[str] = []
    stale_settings: dict[str, int] = {}  # old settings key -> items made with it
    stale_inputs = 0
    for index, item in enumerate(items):
        complete, stale = True, None
        for name in item.files:
            path = out / name
            if not path.exists():
                complete = False
                continue
            mark = read_mark(path) if path.is_file() else None
            if mark is None or mark.command != command:
                foreign.append(name)
            elif mark != item.mark and stale is None:
                stale = mark
        if keep_current and complete and stale is None:
            plan.done.append(index)
            continue
        plan.todo.append(index)
        if keep_current and stale is not None and stale.settings != item.mark.settings:
            stale_settings[stale.settings] = stale_settings.get(stale.settings, 0) + 1
        elif keep_current and stale is not None:
            stale_inputs += 1
    if foreign:
        _refuse_foreign(out, command, foreign)
    table = read_settings(out, command)
    for key, count in stale_settings.items():
        plan.notes.append(f"redoing {count} output(s) in {out} made with other settings "
                          f"({describe_change(table.get(key), settings)})")  # fmt: skip
    if stale_inputs:
        plan.notes.append(f"redoing {stale_inputs} output(s) in {out} made from another version of their "
                          "input (path, size or modification time differ)")  # fmt: skip
    return plan


def _refuse_foreign(out: Path, command: str, names: list[str]) -> None:
    shown = ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
    raise UsageError(
        f"{out}: holds {len(names)} file(s) that msattn {command} would write but did not make ({shown}); "
        "msattn never writes over them (an older msattn's outputs carry no mark either): move them away or "
        "choose another output folder"
    )


# ----------------------------------------------------------------------------- inputs vs outputs


def same_folder(a: Path, b: Path) -> bool:
    """Whether two paths name the same existing folder (or the same path when one does not exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def refuse_inputs_in_out(out: Path, folders: Mapping[str, Path], option: str = "--out") -> None:
    """Refuse an output folder that is one of the input ``folders`` ({what: folder}), before any work."""
    for what, folder in folders.items():
        if same_folder(out, folder):
            raise UsageError(
                f"{option} {out}: is the folder of the {what}; outputs could replace or mix with them: "
                "choose another output folder"
            )


def check_output_file(path: Path, option: str, inputs: Sequence[Path] = (), ours: Any = None) -> None:
    """Check a single output file (e.g. ``--json``) before the work starts; UsageError naming ``option``.

    Refused: a folder; a path whose folder cannot be created or written; one of ``inputs``;
    an existing file that ``ours(path) -> bool`` does not recognise as this command's output.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name, e.g. {path / 'scores.json'}")
    for source in inputs:
        if path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise UsageError(f"{option} {path}: is an input of this command; choose another file")
    if path.exists() and ours is not None and not ours(path):
        raise UsageError(f"{option} {path}: exists and was not written by msattn; msattn never writes over it: "
                         "choose another file or remove it")  # fmt: skip
    parent = Path(os.path.abspath(path)).parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: cannot write in {existing} (permission denied)")


def json_written_by(path: Path, keys: Sequence[str]) -> bool:
    """Whether ``path`` is a JSON object holding all ``keys`` (how a command recognises its earlier output)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)
