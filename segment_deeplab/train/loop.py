"""`fit()`: the plain DeepLab training loop, from a laptop CPU to many GPUs.

Read top to bottom: `setup_run`, then `for step ...: batch -> loss -> backward -> step`,
with validation, checkpoints and logging at fixed step intervals. No hook system.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from segment_deeplab import device as devices
from segment_deeplab.config import Config
from segment_deeplab.data.spec import DatasetSpec
from segment_deeplab.infer.evaluate import evaluate, shard
from segment_deeplab.metrics import background_index
from segment_deeplab.models.inputs import to_input
from segment_deeplab.train import schedule
from segment_deeplab.train.log import RunLog, log_jsonl, open_tensorboard
from segment_deeplab.train.setup import Run, TrainingError, set_train_mode, setup_run

__all__ = ["TrainResult", "TrainingError", "fit", "train_step"]


@dataclass
class TrainResult:
    step: int
    best_miou: float | None
    last_checkpoint: Path | None
    interrupted: bool = False


class _StopFlag:
    """Turns Ctrl-C and SIGTERM into a request to save and stop after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train_step(
    model, images, masks, loss_fn, optimizer, scaler, dtype, device, channels_last, freeze_bn
) -> torch.Tensor:
    """One optimizer step on a uint8 batch; returns the loss as a detached 0-d tensor on
    the device (reading it would wait for the device: the loop reads a window at once)."""
    set_train_mode(model, freeze_bn)
    x = to_input(images, device)
    masks = masks.to(device, non_blocking=True).long()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with devices.autocast(device, dtype):
        logits = model(x)
    loss = loss_fn(logits, masks)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


def _validate(run: Run) -> dict | None:
    """Validation metrics summed over ranks (in the training precision), without the
    bulky per-image parts."""
    if run.val_set is None:
        return None
    spec, info = run.spec, run.info
    metrics = evaluate(
        devices.unwrap(run.model),
        shard(run.val_set, info.rank, info.world_size),
        num_classes=spec.num_classes,
        ignore_index=spec.ignore_index,
        device=info.device,
        progress=False,
        class_names=spec.class_names,
        background=background_index(spec.class_names),
        dtype=run.dtype,
    )
    keep = ("miou", "miou_foreground", "pixel_accuracy", "fwiou", "iou", "class_names")
    return {k: metrics[k] for k in keep if k in metrics}


def _validate_and_keep_best(run: Run, log: RunLog, bar: tqdm) -> None:
    """Validate, log, draw overlays, and save best.pt when the mIoU is the best yet."""
    miou = log.val(run.step, _validate(run))
    log.overlays(run.step, devices.unwrap(run.model), run.val_set)
    if miou is not None:
        bar.write(f"step {run.step}: val mIoU {miou:.4f}")
        if run.best is None or miou > run.best:
            run.best = miou
            run.save("best.pt")


def _check_finite(unchecked: list[tuple[int, torch.Tensor]], run: Run) -> None:
    """Raise if any loss since the last check was not finite; empties `unchecked`.

    Losses stay on the device between checks (one read per window, not one per step);
    the loop checks before every log line, validation and checkpoint, so no checkpoint
    holds weights a non-finite loss has touched."""
    if not unchecked:
        return
    values = torch.stack([loss.float() for _, loss in unchecked]).cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        i = int(bad[0])
        step, loss = unchecked[i][0], float(values[i])
        keep = f"the last good checkpoint is {run.last_path}" if run.last_path else ""
        raise TrainingError(
            f"the loss became {loss} at step {step}; {keep or 'no checkpoint yet'}. "
            "Lower train.lr, set train.warmup_steps, or check the masks with "
            "`deeplab validate`"
        )
    unchecked.clear()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _flush_log(run: Run, log: RunLog) -> dict[str, str]:
    """Write the logging window's record; return the progress bar's postfix."""
    postfix = log.flush()
    frac = run.progress()
    if run.budget and frac > 0:  # tqdm's ETA needs a step count; a time budget has its own
        # budget - elapsed, unless train.min_steps holds the run: then by the step rate.
        postfix["left"] = _clock(run.elapsed * (1 - frac) / frac)
    return postfix


def _progress_bar(run: Run, progress: bool) -> tqdm:
    return tqdm(
        total=run.total,
        initial=run.step,
        disable=not (progress and run.info.is_main),
        unit="step",
        mininterval=0.5 if sys.stderr.isatty() else 30.0,  # logs get a line per 30 s
    )


def _log_shards(run: Run) -> None:
    """Which shards each rank reads (training from shards under torchrun), in the log."""
    if run.spec.manifest is None or not run.info.enabled:
        return
    mine = [shard.url for shard in run.sampler.mine]
    every = devices.gather_objects([mine])
    if run.info.is_main:
        log_jsonl(run.out / "metrics.jsonl", {"step": run.step, "rank_shards": every})


def _finish(run: Run) -> None:
    if run.info.enabled:  # DDP keeps replicas equal; record the proof in the run log
        sums = devices.gather_checksums(devices.unwrap(run.model), run.info)
        if run.info.is_main:
            log_jsonl(run.out / "metrics.jsonl", {"step": run.step, "rank_weight_checksums": sums})
    devices.teardown()


def fit(
    cfg: Config,
    spec: DatasetSpec,
    out_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    verbose: bool = False,
) -> TrainResult:
    """Train a DeepLab model on `spec`'s train split, writing the run into `out_dir`.

    Args:
        cfg: resolved config; `cfg.model.num_classes` is set from the dataset.
        spec: a prepared dataset (with train and, ideally, val splits).
        out_dir: run folder: config.yaml, last.pt, best.pt, metrics.jsonl, tb/.
        resume: continue the run in `out_dir` from its last.pt.
    """
    run = setup_run(cfg, spec, Path(out_dir), resume, device, verbose)
    _log_shards(run)
    tc, info = cfg.train, run.info
    writer = open_tensorboard(run.out, run.step) if info.is_main else None
    log = RunLog(run.out / "metrics.jsonl", writer, spec, info.is_main)
    bar = _progress_bar(run, progress)
    interrupted = False
    done = run.progress() >= 1.0  # a finished run resumed
    t_start = time.perf_counter() - run.elapsed
    unchecked: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet read back
    steps_per_epoch = run.sampler.batches_per_epoch
    with _StopFlag() as stop:
        while not done:
            epoch, in_epoch = divmod(run.step, steps_per_epoch)
            run.sampler.set_epoch(epoch, in_epoch)
            for images, masks in run.loader:
                lr = schedule.get_lr(tc, run.step, run.progress())
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                loss = train_step(
                    run.train_model, images, masks, run.loss_fn, run.optimizer, run.scaler,
                    run.dtype, info.device, run.channels_last, run.freeze_bn,
                )  # fmt: skip
                unchecked.append((run.step, loss))
                run.step += 1
                window_end = run.step % tc.log_every == 0
                if not (info.enabled and run.budget):  # no decision rests on the clock
                    run.elapsed = time.perf_counter() - t_start
                elif window_end:
                    # Every rank must agree on when a time budget ends (and on the LR it
                    # sets): rank 0's clock decides, read once per logging window.
                    run.elapsed = devices.broadcast_float(time.perf_counter() - t_start, info)
                bar.update(1)
                seen = images.shape[0] * info.world_size
                log.train(run.step, epoch, loss, lr, seen, run.elapsed)
                done = run.progress() >= 1.0
                validate = run.step % tc.val_every == 0 or done
                save = run.step % tc.checkpoint_every == 0 or done or stop.signal is not None
                if window_end or validate or save:
                    _check_finite(unchecked, run)
                if window_end:
                    bar.set_postfix(_flush_log(run, log))
                if validate:
                    _validate_and_keep_best(run, log, bar)
                if save:
                    run.last_path = run.save("last.pt")
                if stop.signal is not None:
                    saved = f"saved {run.last_path}"
                    bar.write(f"stopped by signal {stop.signal} at step {run.step}; {saved}")
                    interrupted = done = True
                if done:
                    break
    bar.close()
    log.close()
    _finish(run)
    return TrainResult(run.step, run.best, run.last_path, interrupted)
