"""The pieces of a training run that outlive a process: model setup, optimizer,
precision, and the checkpoint that lets `--resume` continue exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segment_deeplab.checkpoint import FORMAT, CheckpointError, load_file
from segment_deeplab.config import Config, ConfigError, TrainConfig
from segment_deeplab.data.spec import DatasetSpec
from segment_deeplab.device import DistInfo

# Below this per-device batch, batch-norm statistics are too noisy to fine-tune
# (TF DeepLab's fine_tune_batch_norm advice); pretrained statistics are kept instead.
MIN_BN_BATCH = 8


def has_amx() -> bool:
    """CPUs with AMX gain from bf16; others run it slower than fp32."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def resolve_amp(
    amp: str, device: torch.device
) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """Pick the autocast dtype (None = fp32) and a grad scaler for fp16."""
    if amp == "off":
        return None, None
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16" if has_amx() else "off"
        if amp == "off":
            return None, None
    if amp == "bf16":
        return torch.bfloat16, None
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs a CUDA device; use bf16 or off on the CPU")
        return torch.float16, torch.amp.GradScaler("cuda")
    raise ConfigError(f"train.amp must be auto, off, bf16 or fp16, not {amp!r}")


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def prepare_model(
    cfg: Config, info: DistInfo, from_checkpoint: bool, verbose: bool = False
) -> tuple[nn.Module, bool]:
    """Build the model, decide on frozen batch norm, move it, wrap it for DDP."""
    from segment_deeplab.models import build_model

    mc = cfg.model
    if from_checkpoint:  # weights come from last.pt; never download or re-read init files
        mc = Config.from_dict(cfg.to_dict()).model
        mc.pretrained, mc.init_checkpoint = False, None
    model = build_model(mc, verbose=verbose) if verbose else build_model(mc)
    initialised = cfg.model.pretrained or cfg.model.init_checkpoint is not None
    freeze_bn = cfg.train.freeze_bn
    if freeze_bn is None:
        freeze_bn = initialised and cfg.data.batch_size < MIN_BN_BATCH
    synced = info.enabled and info.world_size > 1 and info.device.type == "cuda"
    if not freeze_bn and cfg.data.batch_size < 2 and cfg.model.image_pooling and not synced:
        raise ConfigError(
            "data.batch_size=1 cannot train batch norm: the image-pooling branch sees one "
            "value per channel. Use data.batch_size=2 or more (DeepLab trains with 8+), "
            "start from weights (--init-checkpoint or --pretrained: batch norm is then "
            "frozen at small batches), or set train.freeze_bn=true"
        )
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():
                    p.requires_grad_(False)
    elif info.enabled and info.device.type == "cuda":  # SyncBatchNorm is GPU-only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if info.enabled:
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model, freeze_bn


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (DeepLab) or AdamW; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)
    raise ConfigError(f"train.optimizer must be sgd or adamw, not {cfg.optimizer!r}")


def make_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    cfg: Config,
    spec: DatasetSpec,
    step: int,
    elapsed: float,
    best: float | None,
) -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "step": step,
        "elapsed_s": elapsed,
        "best_miou": best,
        "config": cfg.to_dict(),
        "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in spec.classes],
        "ignore_index": spec.ignore_index,
        "dataset_hash": spec.hash,
        "dataset_path": str(spec.path) if spec.path else None,
    }


@dataclass
class RunState:
    checkpoint: dict[str, Any]
    path: Path

    def restore(self, model: nn.Module, optimizer, scaler) -> tuple[int, float, float | None]:
        """Load weights, optimizer and RNG state; return (step, elapsed seconds, best mIoU)."""
        ck = self.checkpoint
        target = model.module if hasattr(model, "module") else model
        target.load_state_dict(ck["model"])
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
