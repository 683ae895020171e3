"""Everything a training run is made of before its first step: the model (initialised,
batch norm frozen or synced, wrapped for DDP), optimizer, precision, loss, data and
length; `setup_run` assembles them, resuming from last.pt when asked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segment_deeplab import checkpoint
from segment_deeplab import device as devices
from segment_deeplab.atomic import check_writable_dir
from segment_deeplab.config import Config, ConfigError, TrainConfig, save_config
from segment_deeplab.data.dataset import (
    build_loader,
    build_stream_loader,
    open_split,
    resolve_workers,
)
from segment_deeplab.data.spec import DatasetSpec
from segment_deeplab.data.transforms import eval_transforms
from segment_deeplab.losses import build_loss, prior_logit_bias
from segment_deeplab.train import schedule
from segment_deeplab.train.resume import RunState, check_resume, load_run_state, tidy_run_folder

# Below this per-device batch, batch-norm statistics are too noisy to fine-tune
# (TF DeepLab's fine_tune_batch_norm advice); pretrained statistics are kept instead.
MIN_BN_BATCH = 8


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, ...); the last good checkpoint is kept."""


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _decide_freeze_bn(cfg: Config, synced: bool) -> bool:
    """train.freeze_bn, or frozen when fine-tuning with a per-device batch under 8."""
    initialised = cfg.model.pretrained or cfg.model.init_checkpoint is not None
    freeze_bn = cfg.train.freeze_bn
    if freeze_bn is None:
        freeze_bn = initialised and cfg.data.batch_size < MIN_BN_BATCH
    if not freeze_bn and cfg.data.batch_size < 2 and cfg.model.image_pooling and not synced:
        raise ConfigError(
            "data.batch_size=1 cannot train batch norm: the image-pooling branch sees one "
            "value per channel. Use data.batch_size=2 or more (DeepLab trains with 8+), "
            "start from weights (--init-checkpoint or --pretrained: batch norm is then "
            "frozen at small batches), or set train.freeze_bn=true"
        )
    return freeze_bn


def build_train_model(
    cfg: Config,
    info: devices.DistInfo,
    from_checkpoint: bool,
    verbose: bool = False,
    channels_last: bool = False,
) -> tuple[nn.Module, bool]:
    """Build and initialise the model, decide on frozen batch norm, move it (laid out
    channels_last if asked), wrap it for DDP. Returns (model, whether batch norm is
    frozen)."""
    mc = Config.from_dict(cfg.to_dict()).model
    if from_checkpoint:  # weights come from last.pt; never download or re-read init files
        mc.pretrained, mc.init_checkpoint = False, None
    model = checkpoint.build_initialised(mc, verbose)
    synced = info.enabled and info.device.type == "cuda"
    freeze_bn = _decide_freeze_bn(cfg, synced)
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():
                    p.requires_grad_(False)
    elif synced:  # SyncBatchNorm is GPU-only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device)
    if channels_last:
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


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs its gradients scaled; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


@dataclass
class Run:
    """A training run, set up: what the loop reads and updates."""

    cfg: Config
    spec: DatasetSpec
    out: Path
    info: devices.DistInfo
    model: nn.Module  # as trained (DDP-wrapped under torchrun)
    train_model: nn.Module  # `model`, or its torch.compile'd form
    freeze_bn: bool
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    dtype: torch.dtype | None  # autocast dtype; None: fp32
    channels_last: bool  # train.channels_last, decided
    loss_fn: object
    sampler: schedule.EpochBatchSampler  # or a data.stream.ShardStream (shards)
    loader: DataLoader  # or a data.stream.StreamLoader
    val_set: Dataset | None  # SegmentationFolder, or a stream.ShardSplit
    total: int | None  # steps, None when only a time budget bounds the run
    budget: float | None  # seconds
    step: int = 0
    elapsed: float = 0.0
    best: float | None = None
    last_path: Path | None = None

    def progress(self) -> float:
        tc = self.cfg.train
        return schedule.progress(self.step, self.total, self.elapsed, self.budget, tc.min_steps)

    def save(self, name: str) -> Path:
        """last.pt (with the training state) or best.pt (weights only), on rank 0."""
        args = (self.optimizer, self.scaler, self.cfg, self.spec, self.step, self.elapsed)
        ckpt = checkpoint.training_checkpoint(self.model, *args, self.best)
        if name == "best.pt":  # weights only: best.pt is for eval and export
            ckpt = checkpoint.without_training_state(ckpt)
        if self.info.is_main:
            checkpoint.save(ckpt, self.out / name)
        return self.out / name


def _never_saved(out: Path) -> bool:
    """A run folder whose run was stopped before it wrote any checkpoint."""
    return (out / "config.yaml").is_file() and not (out / "best.pt").exists()


def _resume_state(out: Path, resume: bool, cfg: Config, spec, info) -> RunState | None:
    """last.pt of the run to resume; for a new run, a folder that is new or empty.

    A run folder is new or resumed, nothing in between: files of an earlier run (or
    anything else) in `out` are never written over or appended to.
    """
    if resume:
        if not (out / "last.pt").exists() and _never_saved(out):
            # Stopped before its first checkpoint: nothing to continue, nothing to lose.
            if info.is_main:
                tidy_run_folder(out, 0)
            return None
        state = load_run_state(out, info.device)
        check_resume(state.checkpoint, cfg, spec)
        return state
    check_writable_dir(out)
    for folder in (spec.image_dir, spec.mask_dir):
        if out.resolve().is_relative_to(folder.resolve()):
            raise TrainingError(
                f"--output {out} lies inside the dataset's {folder}; put runs elsewhere"
            )
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() and info.is_main else []
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        how = f"continue it with --resume {out}, or " if "last.pt" in held else ""
        raise TrainingError(
            f"{out} already holds {shown}: a new run needs a new or empty folder; "
            f"{how}choose another --output"
        )
    return None


def _tf_arithmetic_for_tf_weights(cfg: Config) -> None:
    """Weights trained in TF DeepLab keep its arithmetic (model.tf_compat): padding,
    input scaling and resizes they were trained with."""
    from segment_deeplab.models.tf_import import is_tf_checkpoint, lraspp_settings

    init = cfg.model.init_checkpoint
    if not init or not is_tf_checkpoint(init):
        return
    if not cfg.model.tf_compat:
        cfg.model.tf_compat = True
        print("model.tf_compat=true: the init checkpoint is TF DeepLab's, and so is its arithmetic")
    head = lraspp_settings(init, cfg.model) if cfg.model.head != "lraspp" else None
    if head:  # the checkpoint's head, not an ASPP it has no weights for
        for key, value in head.items():
            setattr(cfg.model, key, value)
        said = " ".join(f"model.{k}={v}".replace(" ", "") for k, v in head.items())
        print(f"{said}: the init checkpoint has TF DeepLab's mobilenet_v3 head")


def _train_data(cfg: Config, spec: DatasetSpec, info: devices.DistInfo):
    """(epoch schedule, loader) of the train split: a seeded, resumable batch sampler
    over the folders, or the stream of a sharded dataset (data/stream.py)."""
    if spec.manifest is not None:
        return build_stream_loader(
            spec, cfg.data, seed=cfg.train.seed, rank=info.rank, world=info.world_size,
            device=info.device,
        )  # fmt: skip
    n_train = len(spec.read_split("train"))
    sampler = schedule.EpochBatchSampler(
        n_train, cfg.data.batch_size, cfg.train.seed, info.rank, info.world_size
    )
    loader = build_loader(spec, "train", cfg.data, True, device=info.device, batch_sampler=sampler)
    return sampler, loader


def setup_run(
    cfg: Config, spec: DatasetSpec, out: Path, resume: bool, device: str, verbose: bool
) -> Run:
    """Model, optimizer, data and length of a run in `out` (restored from last.pt when
    resuming); the resolved config is written to `out`."""
    info = devices.setup(device)
    cfg.model.num_classes = spec.num_classes
    _tf_arithmetic_for_tf_weights(cfg)
    tc = cfg.train
    if tc.keep_cpu_memory and info.device.type == "cpu":
        devices.keep_freed_memory()
    class_pixels = spec.stats.get("class_pixels")
    if cfg.model.logit_bias is None:  # class weights' shift, taken out at inference
        cfg.model.logit_bias = prior_logit_bias(tc, spec.num_classes, class_pixels)
    if spec.manifest is not None:
        # A stream's batches depend on the worker count: the run records the count it
        # uses, and a resumed run is held to it (resume.check_resume).
        cfg.data.workers = resolve_workers(cfg.data.workers, info.device)
    state = _resume_state(out, resume, cfg, spec, info)
    torch.manual_seed(tc.seed)  # same initial weights on every rank
    dtype = devices.autocast_dtype(tc.amp, info.device)
    channels_last = tc.channels_last
    if channels_last is None:
        channels_last = devices.channels_last_pays(info.device, dtype)
    model, freeze_bn = build_train_model(cfg, info, state is not None, verbose, channels_last)
    optimizer = build_optimizer(model, tc)
    scaler = grad_scaler(dtype, info.device)
    sampler, loader = _train_data(cfg, spec, info)
    has_val = "val" in spec.splits
    run = Run(
        cfg, spec, out, info, model,
        torch.compile(model) if tc.compile else model,
        freeze_bn, optimizer, scaler, dtype, channels_last,
        build_loss(tc, spec.num_classes, spec.ignore_index, class_pixels, info.device),
        sampler, loader,
        open_split(spec, "val", eval_transforms()) if has_val else None,
        schedule.total_steps(tc, sampler.batches_per_epoch),
        schedule.parse_duration(tc.time),
    )  # fmt: skip
    if state is not None:
        run.step, run.elapsed, run.best = state.restore(model, optimizer, scaler)
        run.last_path = state.path
        if info.is_main:
            tidy_run_folder(out, run.step)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if spec.path is None and spec.manifest is None:  # described on the fly: keep it
            spec.save(out / "dataset.yaml")
    return run
