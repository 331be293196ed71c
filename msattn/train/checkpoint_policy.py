"""The one place that decides which checkpoint training writes, and when.

- ``last.pt`` every ``train.checkpoint_every`` iterations and at the last one;
- ``best.pt`` when the held-out split ``data.select_split`` (only when it is set) scores a
  new best;
- ``failed.pt`` when the loss became NaN/inf (the state before the bad step), then training
  stops with :class:`msattn.errors.TrainingError`;
- ``last.pt`` again on **any** failure after a step has finished since the last save (an
  unreadable validation image, a full disk, an exception in the final evaluation, Ctrl-C,
  SIGTERM): the weights, optimizer, scheduler, scaler and the RNG states taken right after
  that step, so that ``--resume`` continues exactly. The error is then re-raised as one line
  that says what failed, which iteration ``last.pt`` holds and how to resume.

Only rank 0 writes. Scheduled checkpoints gather every rank's RNG state (a collective at a
point every rank reaches); a checkpoint written on a failure cannot wait for the other ranks
(they may be stuck or gone), so under DDP it holds rank 0's RNG state and ``None`` for the
others: ``--resume`` then reseeds their dropout (data order and weights stay exact).
"""

from __future__ import annotations

import contextlib
import errno
import math
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from msattn.errors import MsattnError, TrainingError
from msattn.runtime.checkpoint import make_checkpoint, save_checkpoint
from msattn.runtime.distributed import all_gather_objects
from msattn.train.run_folder import begin_run
from msattn.train.step import NonFiniteGuard
from msattn.train.stream import capture_rng, plain_rng, snapshot_rng


class RunStopped(TrainingError):
    """Training stopped after it had begun; ``last.pt`` holds the latest finished step (exit code of the cause)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class CheckpointPolicy:
    """Decides what is written when (see the module docstring); holds the run's best score and last metrics.

    ``setup`` is the :class:`msattn.train.setup.TrainSetup` of the run: its model,
    optimizer, scheduler and scaler are what a checkpoint holds. The run folder's first
    writes (an earlier run's files moved aside with ``--overwrite``, ``config.json``,
    ``metrics.jsonl`` through ``log``) come with the first finished step, or before the first
    checkpoint, whichever is first, so that a run that fails at start-up writes nothing.
    """

    def __init__(self, setup: Any, log: Any) -> None:
        self.s, self.log = setup, log
        self.begun = False
        out, cfg = setup.out_dir, setup.recipe.train
        self.last, self.best, self.failed = out / "last.pt", out / "best.pt", out / "failed.pt"
        self.every, self.total = cfg.checkpoint_every, cfg.iterations
        self.start = setup.start
        self.completed = setup.start  # optimizer steps the weights have taken
        self.saved: int | None = setup.start if setup.start > 0 else None  # the iteration last.pt holds
        self.rng: tuple[Any, ...] | None = None  # this rank's RNG states right after step `completed`
        self.best_miou: float = setup.best_miou
        self.last_metrics: dict[str, Any] = setup.last_metrics
        self.guard = NonFiniteGuard(setup.info.device)
        self.stopped = False  # a non-finite loss was reported (failed.pt written)

    # --- scheduled checkpoints (every rank calls these at the same points)

    def step_done(self, done: int) -> None:
        """Step ``done`` finished (optimizer and scheduler): remember the RNG state a resume from here needs."""
        self.completed = done
        self.rng = snapshot_rng(self.s.info.device)
        if not self.begun:
            self._begin()

    def _begin(self) -> None:
        """The run folder's first writes (rank 0): the earlier run aside (--overwrite), config.json, metrics.jsonl."""
        self.begun = True
        if not self.s.info.is_main:
            return
        moved = begin_run(self.s.out_dir, self.s.config, self.s.replaced)
        self.log.open()
        if moved is not None:
            self.s.console.print(f"--overwrite: the earlier run's files moved to {moved}", markup=False)

    def last_due(self, done: int) -> bool:
        return bool(self.every and done % self.every == 0) or done == self.total

    def after_step(self, done: int, select_miou: float | None) -> None:
        """last.pt when due, best.pt when the held-out split improved."""
        targets = [self.last] if self.last_due(done) else []
        if select_miou is not None and select_miou > self.best_miou:
            self.best_miou = select_miou
            targets.append(self.best)
        if targets:
            self._write(done, targets, all_gather_objects(capture_rng(self.s.info.device), self.s.info))
            if self.last in targets:
                self.saved = done

    def stop_if_nonfinite(self) -> None:
        """Host check of the guard (a sync: at log, validation and checkpoint points only): failed.pt and stop."""
        bad = self.guard.first_bad()
        if bad is None:
            return
        offset, value = bad
        iteration = self.start + offset
        self._write(iteration, [self.failed], all_gather_objects(capture_rng(self.s.info.device), self.s.info))
        self.stopped = True
        saved = "the weights and optimizer state before that step"
        if self.s.scaler.is_enabled():
            saved = "the weights at this point (the GradScaler skipped the non-finite steps)"
        raise TrainingError(
            f"loss became {value} at iteration {iteration + 1}; {saved} are saved in {self.failed} "
            f"({self._last_text()}). Lower optim.lr, check the data, or use train.amp=bf16/off, then resume with "
            "--resume"
        )

    # --- on failure (each rank on its own: no collectives)

    def on_failure(self, exc: BaseException, resume_hint: str) -> BaseException | None:
        """Save last.pt after ``exc`` stopped training; returns the exception to raise (None: re-raise ``exc``).

        Nothing happens when no step finished in this process (the error comes as it is),
        after a non-finite loss was reported, and on ranks other than 0.
        """
        if self.stopped or self.completed == self.start or not self.s.info.is_main:
            return None
        note = self._save_after_failure()
        message = f"training stopped after iteration {self.completed} of {self.total}: {describe(exc)}; {note}"
        message += "" if self.saved is None else f"; to continue: {resume_hint}"
        if isinstance(exc, KeyboardInterrupt):
            return KeyboardInterrupt(message)
        if isinstance(exc, MsattnError):
            return RunStopped(message, exc.exit_code)
        if isinstance(exc, Exception):
            return RunStopped(message, 1)
        return None  # SystemExit and the like: saved, passed on as they are

    def _save_after_failure(self) -> str:
        try:
            bad = self.guard.first_bad()
        except Exception:  # noqa: BLE001 - a broken device (CUDA error) cannot tell; do not save its state
            return f"the device failed, nothing was saved ({self._last_text()})"
        if bad is not None:
            return f"the loss had become {bad[1]} at iteration {self.start + bad[0] + 1}, so nothing was saved " \
                f"({self._last_text()})"
        if self.saved != self.completed and self.rng is not None:
            per_rank = [plain_rng(self.rng)] + [None] * (self.s.info.world_size - 1)  # others': see the docstring
            try:
                self._write(self.completed, [self.last], per_rank)
                self.saved = self.completed
            except Exception as save_exc:  # noqa: BLE001 - report the first failure; say this one too
                return f"saving {self.last} failed too ({describe(save_exc)}); {self._last_text()}"
        return self._last_text()

    def _last_text(self) -> str:
        if self.saved is None:
            return "no last.pt was written"
        return f"{self.last} holds iteration {self.saved}"

    def _write(self, iteration: int, paths: list[Path], per_rank_rng: list[Any]) -> None:
        if not self.s.info.is_main:
            return
        if not self.begun:
            self._begin()
        s = self.s
        state = make_checkpoint(
            s.model,
            s.dataset_meta,
            s.config,
            iteration,
            optimizer=s.optimizer.state_dict(),
            scheduler=s.scheduler.state_dict(),
            scaler=s.scaler.state_dict(),
            rng={"per_rank": per_rank_rng},
            best_miou=self.best_miou if math.isfinite(self.best_miou) else None,
            metrics=self.last_metrics,
            stream={"seed": s.recipe.train.seed, "batch_size": s.recipe.train.batch_size,
                    "next_sample": iteration * s.recipe.train.batch_size},
            backends=s.backends,
        )  # fmt: skip
        for path in paths:
            save_checkpoint(path, state)


def describe(exc: BaseException) -> str:
    """What failed, on one line (the original message of an error re-raised by a DataLoader worker)."""
    if isinstance(exc, KeyboardInterrupt):
        return str(exc) or "interrupted"
    if isinstance(exc, OSError) and not isinstance(exc, MsattnError):
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        return f"{exc.filename}: {reason}" if exc.filename else reason
    text = str(exc).strip()
    if "Original Traceback" in text:  # torch's ExceptionWrapper: "Caught X in DataLoader worker...\n<traceback>"
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[-1]
    text = " ".join(text.splitlines())
    if isinstance(exc, MsattnError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def signals_between_steps() -> Iterator[Callable[[], contextlib.AbstractContextManager[None]]]:
    """Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt, but never in the middle of an optimizer step.

    Yields ``uninterrupted``: a signal that arrives inside ``with uninterrupted():`` is raised when
    the block ends, so the weights, optimizer and scheduler are always those of a whole step.
    Outside the main thread (where signals cannot be handled) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield contextlib.nullcontext
        return
    flags: dict[str, Any] = {"inside": False, "pending": None}

    def handler(signum: int, frame: Any) -> None:
        text = f"interrupted ({signal.Signals(signum).name})"
        if flags["inside"]:
            flags["pending"] = text
            return
        raise KeyboardInterrupt(text)

    @contextlib.contextmanager
    def uninterrupted() -> Iterator[None]:
        flags["inside"] = True
        try:
            yield
        finally:
            flags["inside"] = False
            if flags["pending"] is not None:
                text, flags["pending"] = flags["pending"], None
                raise KeyboardInterrupt(text)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield uninterrupted
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
