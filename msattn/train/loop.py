"""Training: prepare, loop, checkpoint policy, final report; a loop you can read top to bottom (nanoGPT style).

``train(recipe, out_dir)`` goes through four steps, each in its own module:

1. **prepare** (:mod:`msattn.train.setup`): everything that can be checked is checked in
   seconds, before the first step, and nothing is written: the recipe, the run folder (locked
   for the whole run, apart from the inputs, not another run's unless ``--resume`` or
   ``--overwrite``, writable), ``last.pt`` on resume (:mod:`msattn.train.resume`), every
   id of the train/val/select lists, the initial weights. Then data, model, SGD/AdamW
   optimizer and LambdaLR schedule are built.
2. **the loop** (:func:`run_loop`, below): ``train.iterations`` optimizer steps of
   ``train.batch_size`` images (the global batch), dealt out to the DDP ranks under
   ``torchrun`` in micro-batches of at most ``train.micro_batch`` (gradient accumulation;
   :func:`msattn.train.stream.split_batch`), the loss a mean over the whole batch; the data
   stream is a pure function of the seed (:mod:`msattn.train.stream`); the host reads the
   loss only at log points.
3. **the checkpoint policy** (:mod:`msattn.train.checkpoint_policy`): the one place that
   decides what is written when: ``last.pt`` / ``best.pt`` / ``failed.pt``, and ``last.pt``
   on any failure after a step finished, before the error is reported.
4. **the final report** (:mod:`msattn.train.report`): the per-class table and eval.json.

The run folder gets ``config.json``, ``metrics.jsonl``, ``last.pt`` / ``best.pt`` (atomic) and
TensorBoard events when tensorboard is installed, all from the first finished step on.
``--resume`` continues bit for bit on CPU (on CUDA as far as the kernels are deterministic).
"""

from __future__ import annotations

import functools
import os
import shlex
from pathlib import Path

from rich.console import Console

from msattn.config.bundled import resolve_recipe
from msattn.config.recipe import Recipe, load_recipe
from msattn.errors import UsageError
from msattn.models.loss import segmentation_loss
from msattn.runtime.distributed import barrier, process_group
from msattn.runtime.loader import DeviceBatches, train_workers
from msattn.runtime.metrics import format_miou
from msattn.train.checkpoint_policy import CheckpointPolicy, RunStopped, signals_between_steps
from msattn.train.report import LossWindow, MetricsLog, memory_mb, progress_bar, report_final, run_validation
from msattn.train.run_folder import run_folder_lock
from msattn.train.setup import TrainSetup, check_before_lock, dry_run_report, prepare, resolve_paths
from msattn.train.step import lr_factor, train_step
from msattn.train.stream import backend_flags, make_train_loader, split_batch

# ----------------------------------------------------------------------------- entry points


def train_from_recipe(
    recipe_path: str | os.PathLike[str],
    overrides: list[str],
    out: Path | None = None,
    resume: bool = False,
    dry_run: bool = False,
    device: str | None = None,
    overwrite: bool = False,
) -> Path | None:
    """``msattn train``: load and validate the recipe, then train (or only print it with ``dry_run``).

    ``recipe_path`` is a file or a bundled recipe's name (:func:`msattn.config.bundled.resolve_recipe`:
    a file wins, and a note on stderr says which was used). The run folder defaults to
    ``runs/<recipe file stem>``. Returns the final checkpoint path.
    """
    path, note = resolve_recipe(recipe_path)
    if note and os.environ.get("RANK", "0") in ("0", ""):  # once under torchrun
        Console(stderr=True, highlight=False, soft_wrap=True).print(note, markup=False)
    recipe = load_recipe(path, overrides)
    out_dir = Path(out) if out is not None else Path("runs") / path.stem
    if dry_run:
        dry_run_report(recipe, out_dir, resume=resume, overwrite=overwrite, recipe_path=path)
        return None
    words = ["msattn", "train", os.fspath(recipe_path), *(f"--set={o}" for o in overrides), "--out", str(out_dir)]
    try:
        return train(recipe, out_dir, resume=resume, device=device, overwrite=overwrite,
                     recipe_path=path, command=shlex.join(words))  # fmt: skip
    except KeyboardInterrupt as exc:
        if not str(exc):
            raise
        # what was saved, as the CLI's one line (exit 130): a bare KeyboardInterrupt is swallowed by Typer
        raise RunStopped(str(exc), exit_code=130) from exc


def train(
    recipe: Recipe,
    out_dir: Path,
    resume: bool = False,
    device: str | None = None,
    *,
    overwrite: bool = False,
    recipe_path: Path | None = None,
    command: str | None = None,
) -> Path:
    """Train ``recipe`` into ``out_dir`` (``device`` overrides ``train.device``); returns the last checkpoint.

    ``overwrite`` replaces a run already in ``out_dir`` (its files move to ``replaced-<time>/``);
    ``recipe_path`` (the recipe file, checked not to be an output) and ``command`` (the command
    line, named to a second writer and in the resume hint of an error) come from the CLI.
    After a failure past the first step, ``last.pt`` holds the latest step and the error says so
    (:class:`msattn.train.checkpoint_policy.RunStopped`; a KeyboardInterrupt stays one).
    """
    if resume and overwrite:
        raise UsageError("--resume continues the run in the folder and --overwrite replaces it: give one of them")
    out_dir = Path(out_dir)
    recipe = resolve_paths(recipe)
    hint = f"{command} --resume" if command else "train(..., resume=True) or msattn train RECIPE --out DIR --resume"
    command = command or "msattn.train.loop.train()"
    with (
        process_group(device if device is not None else recipe.train.device) as info,
        backend_flags(recipe.train, info.device),
    ):
        console = Console(highlight=False, soft_wrap=True, quiet=not info.is_main)
        check_before_lock(recipe, out_dir, resume, overwrite, info, recipe_path)
        with run_folder_lock(out_dir, command, info):
            setup = prepare(recipe, out_dir, resume, overwrite, info, console)
            log = MetricsLog(out_dir, setup.start, enabled=info.is_main)
            policy = CheckpointPolicy(setup, log)
            try:
                run_loop(setup, policy, log)
                finish(setup, policy, log)
            except BaseException as exc:
                stopped = policy.on_failure(exc, resume_hint=hint)
                if stopped is None:
                    raise
                raise stopped from exc
            finally:
                log.close()
    return out_dir / "last.pt"


# ----------------------------------------------------------------------------- the loop


def run_loop(s: TrainSetup, policy: CheckpointPolicy, log: MetricsLog) -> None:
    """Step from ``s.start`` to ``train.iterations``: log, validate and let the policy checkpoint."""
    recipe, cfg, info = s.recipe, s.recipe.train, s.info
    workers = train_workers(recipe.data.workers, s.train_set, info.device)  # "auto": from CPUs and decode rate
    s.console.print(workers.reason, markup=False)
    loader = make_train_loader(s.train_set, cfg.batch_size, recipe.micro_batch, cfg.seed, s.start, cfg.iterations,
                               info.rank, info.world_size, workers.count, info.device.type == "cuda")  # fmt: skip
    # uint8 batches, normalised on the device; the time spent waiting for them is logged as data_wait
    batches = DeviceBatches(loader, info.device, s.train_set.transform.mean, s.train_set.transform.std)
    step = functools.partial(
        train_step, s.train_model, optimizer=s.optimizer, scaler=s.scaler, device=info.device, amp_dtype=s.amp_dtype,
        channels_last=cfg.channels_last, loss_fn=segmentation_loss,
        loss_options={"extra_supervision": recipe.model.extra_supervision, "label_mode": cfg.label_mode,
                      "extra_supervision_weight": recipe.model.extra_supervision_weight,
                      "ignore_index": s.dataset_info.ignore_index},
        scales=tuple(recipe.model.scales), info=info,
    )  # fmt: skip
    window = LossWindow()
    announce(s)
    s.train_model.train()
    with progress_bar(s.console, enabled=info.is_main) as progress, signals_between_steps() as uninterrupted:
        task = progress.add_task("train", total=cfg.iterations, completed=s.start, loss=float("nan"))
        for it in range(s.start, cfg.iterations):
            with uninterrupted():  # one optimizer step: `accumulation` micro-batches on every rank, no host sync
                window.add(step([next(batches) for _ in range(s.accumulation)], guard=policy.guard))
                s.scheduler.step()
                policy.step_done(it + 1)
            done = it + 1
            validate = (s.val_set is not None or s.select_set is not None) and (
                (cfg.val_every and done % cfg.val_every == 0) or done == cfg.iterations
            )
            if done % cfg.log_every == 0 or validate or policy.last_due(done):
                policy.stop_if_nonfinite()
            if done % cfg.log_every == 0 or done == cfg.iterations:
                loss = log_point(s, log, window, done, batches.take_wait())
                progress.update(task, loss=loss)
            progress.update(task, completed=done)
            select_miou = validation_point(s, policy, log, done) if validate else None
            policy.after_step(done, select_miou)
            s.train_model.train()


def announce(s: TrainSetup) -> None:
    cfg, info = s.recipe.train, s.info
    world = info.world_size
    s.console.print(
        f"training {cfg.iterations - s.start} iterations (from {s.start}) on {info.device}"
        f"{f' x {world} ranks' if world > 1 else ''}, {len(s.train_set)} images, run folder {s.out_dir}",
        markup=False,
    )
    s.console.print(split_batch(cfg.batch_size, s.recipe.micro_batch, world).describe(), markup=False)


def log_point(s: TrainSetup, log: MetricsLog, window: LossWindow, done: int, data_wait_s: float = 0.0) -> float:
    """One metrics.jsonl line: loss terms averaged over the window and the ranks, lr, throughput, the share
    of the window spent waiting for data (``data_wait``: a starved GPU shows here), memory."""
    cfg = s.recipe.train
    iterations, elapsed = window.iterations, window.elapsed()
    record = {"iteration": done, **window.means(s.info)}
    record["lr"] = s.recipe.optim.lr * lr_factor(s.recipe)(done - 1)  # the lr of this step (backbone weights)
    record["images_per_s"] = iterations * cfg.batch_size / max(elapsed, 1e-9)
    record["data_wait"] = min(1.0, data_wait_s / max(elapsed, 1e-9))
    record["memory_mb"] = memory_mb(s.info.device)
    log.write(record)
    s.console.print(
        f"it {done:>6}/{cfg.iterations}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
        f"{record['images_per_s']:.1f} img/s  data wait {record['data_wait']:.0%}  {record['memory_mb']:.0f} MB",
        markup=False,
    )
    return record["loss"]


def validation_point(s: TrainSetup, policy: CheckpointPolicy, log: MetricsLog, done: int) -> float | None:
    """Score the val split (reported) and the select split (returned: it chooses best.pt)."""
    total, select_miou = s.recipe.train.iterations, None
    if s.val_set is not None:  # the scored split
        metrics = run_validation(s.model, s.val_set, s.recipe, s.dataset_info, s.info)
        policy.last_metrics = metrics
        log.write({"iteration": done, "val_miou": metrics["miou"], "val_pixel_accuracy": metrics["pixel_accuracy"]})
        s.console.print(f"it {done:>6}/{total}  val mIoU {format_miou(metrics['miou'])}  "
                        f"pixel acc {format_miou(metrics['pixel_accuracy'])}", markup=False)  # fmt: skip
    if s.select_set is not None:  # the held-out split that chooses best.pt
        select_miou = run_validation(s.model, s.select_set, s.recipe, s.dataset_info, s.info)["miou"]
        log.write({"iteration": done, "select_miou": select_miou})
        s.console.print(f"it {done:>6}/{total}  {s.recipe.data.select_split} mIoU {format_miou(select_miou)} "
                        "(chooses best.pt)", markup=False)  # fmt: skip
    return select_miou


def finish(s: TrainSetup, policy: CheckpointPolicy, log: MetricsLog) -> None:
    """After the loop: every rank done, then the final report of last.pt's validation (rank 0)."""
    barrier(s.info)
    log.close()
    total = s.recipe.train.iterations
    if s.start >= total:
        s.console.print(f"{s.out_dir / 'last.pt'} is already at iteration {s.start} of {total}: nothing to train",
                        markup=False)  # fmt: skip
    if s.recipe.train.eval_at_end and s.info.is_main:
        report_final(s.recipe, s.out_dir, policy.last_metrics, s.dataset_info, s.console)
