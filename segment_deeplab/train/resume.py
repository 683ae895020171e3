"""Continuing a run: what last.pt restores, and which settings may change on resume."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segment_deeplab.atomic import write_text
from segment_deeplab.checkpoint import FORMAT, CheckpointError, load_file
from segment_deeplab.config import Config, ConfigError
from segment_deeplab.data.spec import DatasetSpec
from segment_deeplab.device import unwrap


@dataclass
class RunState:
    """A run's last.pt, read for `--resume`."""

    checkpoint: dict[str, Any]
    path: Path

    def restore(self, model: nn.Module, optimizer, scaler) -> tuple[int, float, float | None]:
        """Load weights, optimizer and RNG state; return (step, elapsed seconds, best mIoU)."""
        ck = self.checkpoint
        unwrap(model).load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        rng = ck.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return int(ck["step"]), float(ck.get("elapsed_s", 0.0)), ck.get("best_miou")


def load_run_state(run_dir: Path, device: torch.device) -> RunState:
    path = run_dir / "last.pt"
    if not path.is_file():
        raise CheckpointError(
            f"nothing to resume in {run_dir}: no last.pt (start a new run with --output instead)"
        )
    ck = load_file(path, map_location=device)
    if ck.get("format") != FORMAT or "optimizer" not in ck:
        raise CheckpointError(f"{path} is not a resumable segment-deeplab training checkpoint")
    return RunState(ck, path)


# Settings a resumed run may change: how long it runs, how often it logs, validates
# and saves, how the loader and the model are run. Any other change (model, data
# pipeline, optimizer, loss, precision, seed) would make it another run: refused.
MAY_CHANGE = (
    "train.steps",
    "train.epochs",
    "train.time",
    "train.min_steps",
    "train.val_every",
    "train.checkpoint_every",
    "train.log_every",
    "train.compile",
    "data.workers",
)
# Filled in from the dataset or the weights, not chosen: never a difference.
_DERIVED = ("model.num_classes", "model.logit_bias", "model.pretrained", "model.init_checkpoint")


def _flat(cfg: Config) -> dict[str, object]:
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}


def check_resume(ckpt: dict[str, Any], cfg: Config, spec: DatasetSpec) -> None:
    """Refuse to resume with another model, data pipeline, recipe or dataset; list the
    differences. Only `MAY_CHANGE` settings may differ from the run's."""
    old, new = _flat(Config.from_dict(ckpt["config"])), _flat(cfg)
    skip = set(MAY_CHANGE) | set(_DERIVED)
    diffs = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in old if k not in skip and old[k] != new[k]]
    if spec.manifest is not None and old["data.workers"] != new["data.workers"]:
        # A stream's batches are dealt to loader workers: another count, other batches.
        diffs.append(
            f"data.workers: {old['data.workers']!r} -> {new['data.workers']!r} (training "
            "from shards, the batches depend on it: resume with the same data.workers)"
        )
    classes = [c["name"] for c in ckpt.get("classes", [])]
    if classes != spec.class_names:
        diffs.append(f"classes: {classes} -> {spec.class_names}")
    if ckpt.get("dataset_hash") and spec.hash and ckpt["dataset_hash"] != spec.hash:
        diffs.append(f"dataset hash: {ckpt['dataset_hash']} -> {spec.hash}")
    if diffs:
        raise ConfigError(
            "cannot resume: this run was started with a different setup:\n  "
            + "\n  ".join(diffs)
            + f"\nA resumed run may change only {', '.join(MAY_CHANGE)}. Resume with the "
            "original settings, or start a new run (--output NEW_DIR, optionally "
            "--init-checkpoint from this run's last.pt)"
        )


def tidy_run_folder(out: Path, step: int) -> None:
    """Before a resumed run goes on: drop temporary files a killed write left, and the
    log records of steps after the checkpoint (they will be trained and logged again)."""
    for tmp in out.glob(".*.tmp"):
        if tmp.name.split(".")[1] in ("last", "best", "config", "dataset", "report", "metrics"):
            tmp.unlink(missing_ok=True)
    log = out / "metrics.jsonl"
    if not log.is_file():
        return
    kept = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut off by the kill
            continue
    write_text(log, "".join(f"{line}\n" for line in kept))
