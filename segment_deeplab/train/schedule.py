"""What a run's length and position mean: time budgets, the LR schedule, the data order.

Everything here is a pure function of (seed, epoch, step, elapsed), so a resumed run
continues on the same learning rate and the same batches as an uninterrupted one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from segment_deeplab.config import ConfigError, TrainConfig

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | None) -> float | None:
    """'90s', '20m', '1h30m', '2h' or plain seconds -> seconds."""
    if text is None:
        return None
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
        if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
            raise ConfigError(f"cannot read the time budget '{text}'; write e.g. 90s, 20m or 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"the time budget '{text}' is no time at all; give e.g. 90s or 20m")
    return seconds


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int | None:
    """The run's step count; None when only a time budget bounds it."""
    if cfg.min_steps is not None and cfg.time is None:
        raise ConfigError(
            "train.min_steps keeps a time budget from ending a run too early; give it with "
            "--time (e.g. --time 2m --min-steps 100), or use --steps for a fixed length"
        )
    if cfg.steps is not None:
        return int(cfg.steps)
    if cfg.epochs is not None:
        return int(cfg.epochs) * steps_per_epoch
    if cfg.time is not None:
        return None
    raise ConfigError("the run has no length: give --steps, --epochs or --time (e.g. --time 20m)")


def progress(
    step: int,
    total: int | None,
    elapsed: float,
    budget: float | None,
    min_steps: int | None = None,
) -> float:
    """How far through the run we are, 0..1, by steps or by wall clock, whichever is
    further; a time budget counts only as far as `min_steps` has been reached."""
    p = 0.0
    if total:
        p = step / total
    if budget:
        by_clock = elapsed / budget
        if min_steps:
            by_clock = min(by_clock, step / min_steps)
        p = max(p, by_clock)
    return min(p, 1.0)


def get_lr(cfg: TrainConfig, step: int, frac: float) -> float:
    """Linear warm-up, then DeepLab's poly decay: lr * (1 - progress) ** power."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * (1.0 - frac) ** cfg.poly_power


class EpochBatchSampler:
    """Seeded, resumable batches of (index, augmentation seed) pairs, sharded by rank.

    Epoch e shuffles with seed (seed, e); each sample also gets its own augmentation
    seed, so the crops and flips of a resumed run equal those of an uninterrupted one,
    with or without worker processes.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < batch_size * world:
            raise ConfigError(
                f"the train split has {n} images, fewer than one batch ({batch_size} x {world} "
                "processes); lower data.batch_size or add images"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world) - self.start

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g)
        per_step = self.batch_size * self.world
        for b in range(self.start, self.batches_per_epoch):
            chunk = range(b * per_step, (b + 1) * per_step)
            mine = list(chunk)[self.rank :: self.world]
            yield [(int(order[i]), int(seeds[i])) for i in mine]
