"""Continuing a run: what last.pt restores, and which settings may change on resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


def _diff(old: dict, new: dict, prefix: str) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{prefix}{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)
    ]


def check_resume(ckpt: dict[str, Any], cfg: Config, spec: DatasetSpec) -> None:
    """Refuse to resume with another model, data pipeline or dataset; list the differences."""
    old = Config.from_dict(ckpt["config"])
    old.model.num_classes = cfg.model.num_classes or old.model.num_classes
    ignore = {"pretrained", "init_checkpoint", "logit_bias"}
    om = {k: v for k, v in vars(old.model).items() if k not in ignore}
    nm = {k: v for k, v in vars(cfg.model).items() if k not in ignore}
    diffs = _diff(om, nm, "model.")
    diffs += _diff(
        {"batch_size": old.data.batch_size, "seed": old.train.seed},
        {"batch_size": cfg.data.batch_size, "seed": cfg.train.seed},
        "",
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
            + "\nResume with the original settings, or start a new run (--output NEW_DIR,"
            " optionally --init-checkpoint from this run's last.pt)"
        )
