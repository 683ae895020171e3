"""`fit()`: the plain DeepLab training loop, from a laptop CPU to many GPUs.

Read top to bottom: set up, then `for step ...: batch -> loss -> backward -> step`,
with validation, checkpoints and logging at fixed step intervals. No hook system.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from segment_deeplab.config import Config, save_config
from segment_deeplab.data.spec import DatasetSpec
from segment_deeplab import device as distributed
from segment_deeplab.train import schedule
from segment_deeplab.train.log import RunLog, log_jsonl, open_tensorboard
from segment_deeplab.train.setup import (
    RunState,
    build_optimizer,
    check_resume,
    load_run_state,
    make_checkpoint,
    prepare_model,
    resolve_amp,
)
from segment_deeplab.losses import build_loss, prior_logit_bias


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, ...); the last good checkpoint is kept."""


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


def _validate(model, val_set, spec: DatasetSpec, info: distributed.DistInfo) -> dict | None:
    """Validation metrics summed over ranks, without the bulky per-image parts."""
    if val_set is None:
        return None
    from segment_deeplab.infer.evaluate import evaluate, shard
    from segment_deeplab.metrics import background_index

    metrics = evaluate(
        model,
        shard(val_set, info.rank, info.world_size),
        num_classes=spec.num_classes,
        ignore_index=spec.ignore_index,
        device=info.device,
        progress=False,
        class_names=spec.class_names,
        background=background_index(spec.class_names),
    )
    keep = ("miou", "miou_foreground", "pixel_accuracy", "fwiou", "iou", "class_names")
    return {k: metrics[k] for k in keep if k in metrics}


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
    from segment_deeplab.data.dataset import SegmentationFolder, build_loader
    from segment_deeplab.data.transforms import eval_transforms

    out = Path(out_dir)
    info = distributed.setup(device)
    cfg.model.num_classes = spec.num_classes
    tc = cfg.train
    if cfg.model.logit_bias is None:  # class weights' shift, taken out at inference
        cfg.model.logit_bias = prior_logit_bias(
            tc, spec.num_classes, spec.stats.get("class_pixels")
        )

    state: RunState | None = None
    if resume:
        state = load_run_state(out, info.device)
        check_resume(state.checkpoint, cfg, spec)
    elif info.is_main and (out / "last.pt").exists():
        raise TrainingError(
            f"{out} already holds a run (last.pt); continue it with --resume {out}, "
            "or choose another --output"
        )

    torch.manual_seed(tc.seed)  # same initial weights on every rank
    model, freeze_bn = prepare_model(cfg, info, from_checkpoint=state is not None, verbose=verbose)
    optimizer = build_optimizer(model, tc)
    amp_dtype, scaler = resolve_amp(tc.amp, info.device)

    val_set = (
        SegmentationFolder(spec, "val", transform=eval_transforms())
        if "val" in spec.splits
        else None
    )
    sampler = schedule.EpochBatchSampler(
        len(spec.split_stems("train")), cfg.data.batch_size, tc.seed, info.rank, info.world_size
    )
    loader = build_loader(spec, "train", cfg.data, True, device=info.device, batch_sampler=sampler)
    steps_per_epoch = sampler.batches_per_epoch
    total = schedule.total_steps(tc, steps_per_epoch)
    budget = schedule.parse_duration(tc.time)
    loss_fn = build_loss(
        tc, spec.num_classes, spec.ignore_index, spec.stats.get("class_pixels"), info.device
    )

    step, elapsed, best = 0, 0.0, None
    if state is not None:
        step, elapsed, best = state.restore(model, optimizer, scaler)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if spec.path is None:  # a dataset described on the fly: keep its description
            spec.save(out / "dataset.yaml")
    writer = open_tensorboard(out) if info.is_main else None
    raw_model = model.module if hasattr(model, "module") else model
    train_model = torch.compile(model) if tc.compile else model

    def save(name: str) -> Path:
        ckpt = make_checkpoint(raw_model, optimizer, scaler, cfg, spec, step, elapsed, best)
        path = out / name
        if info.is_main:
            from segment_deeplab.checkpoint import atomic_save

            if name == "best.pt":  # weights only: best.pt is for eval and export
                for key in ("optimizer", "scaler", "rng"):
                    ckpt.pop(key, None)
            atomic_save(ckpt, path)
        return path

    log = RunLog(out / "metrics.jsonl", writer, spec, info.is_main)
    bar = tqdm(
        total=total,
        initial=step,
        disable=not (progress and info.is_main),
        unit="step",
        mininterval=0.5 if sys.stderr.isatty() else 30.0,  # logs get a line per 30 s
    )
    last_path = state.path if state else None
    interrupted = False
    done = schedule.progress(step, total, elapsed, budget) >= 1.0  # a finished run resumed
    t_start = time.perf_counter() - elapsed
    with _StopFlag() as stop:
        while not done:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, in_epoch)
            for images, masks in loader:
                frac = schedule.progress(step, total, elapsed, budget)
                lr = schedule.get_lr(tc, step, frac)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = _train_step(
                    train_model, images, masks, loss_fn, optimizer, scaler, amp_dtype, info,
                    tc.channels_last, freeze_bn,
                )  # fmt: skip
                if not math.isfinite(loss):
                    keep = f"the last good checkpoint is {last_path}" if last_path else ""
                    raise TrainingError(
                        f"the loss became {loss} at step {step}; {keep or 'no checkpoint yet'}. "
                        "Lower train.lr, set train.warmup_steps, or check the masks with "
                        "`deeplab validate`"
                    )
                step += 1
                # Every rank must agree on when a time budget ends: rank 0's clock decides.
                elapsed = distributed.broadcast_float(time.perf_counter() - t_start, info)
                bar.update(1)
                log.train(step, epoch, loss, lr, images.shape[0] * info.world_size, elapsed)
                if step % tc.log_every == 0:
                    postfix = log.flush()
                    if budget:  # tqdm's ETA needs a step count; a time budget has its own
                        postfix["left"] = _clock(max(budget - elapsed, 0.0))
                    bar.set_postfix(postfix)
                done = schedule.progress(step, total, elapsed, budget) >= 1.0
                if step % tc.val_every == 0 or done:
                    miou = log.val(step, _validate(raw_model, val_set, spec, info))
                    log.overlays(step, raw_model, val_set)
                    if miou is not None:
                        bar.write(f"step {step}: val mIoU {miou:.4f}")
                        if best is None or miou > best:
                            best = miou
                            save("best.pt")
                if step % tc.checkpoint_every == 0 or done or stop.signal is not None:
                    last_path = save("last.pt")
                if stop.signal is not None:
                    bar.write(f"stopped by signal {stop.signal} at step {step}; saved {last_path}")
                    interrupted = done = True
                if done:
                    break
    bar.close()
    log.close()
    if info.enabled:  # DDP keeps replicas equal; record the proof in the run log
        sums = distributed.gather_checksums(raw_model, info)
        if info.is_main:
            log_jsonl(out / "metrics.jsonl", {"step": step, "rank_weight_checksums": sums})
    distributed.teardown()
    return TrainResult(step, best, last_path, interrupted)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _train_step(
    model, images, masks, loss_fn, optimizer, scaler, amp_dtype, info, channels_last, freeze_bn
) -> float:
    from segment_deeplab.train.setup import set_train_mode

    set_train_mode(model, freeze_bn)
    images = images.to(info.device, non_blocking=True).float().div_(255)
    masks = masks.to(info.device, non_blocking=True).long()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(
        info.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    ):
        logits = model(images)
    loss = loss_fn(logits, masks)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())
