"""Test helpers: a tiny model config, a tiny prepared dataset, a SIGTERM at a given step."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from segment_deeplab.cli import main
from segment_deeplab.train import loop as train_mod

# A DeepLabV3+ small enough to train a few steps in seconds on a CPU.
TINY = [
    "model.model_variant=resnet_18",
    "model.aspp_channels=16",
    "model.decoder_channels=16",
    "model.low_level_channels=8",
    "data.crop_size=[64,64]",
    "data.batch_size=4",
    "data.workers=0",
    "train.lr=0.02",
    "train.log_every=1",
    "train.val_every=1000",
    "train.checkpoint_every=1000",
]

# The same with a lighter backbone: checkpoints of a few MB, quick to write every step.
SMALL = ["model.model_variant=mobilenet_v3_small", *TINY[1:]]


def make_dataset(root: Path, seed: int = 1) -> Path:
    """16 synthetic 64x80 pairs, prepared with a 12/4 train/val split."""
    assert main(["synth", str(root), "--num", "16", "--size", "64", "80", "--seed", str(seed)]) == 0
    assert main(["prepare", str(root), "--val-fraction", "0.25"]) == 0
    return root


def stop_at(monkeypatch, at_call: int) -> None:
    """Deliver SIGTERM to ourselves during the `at_call`-th training step (as Ctrl-C would)."""
    real, calls = train_mod.train_step, {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "train_step", step)


def make_run(run: Path, classes: list[dict]) -> Path:
    """`run`/best.pt: a tiny mobilenet DeepLabV3+ whose random weights give clear argmaxes
    (a fresh classifier's near-equal logits would not), as training would save it."""
    import torch

    from segment_deeplab.checkpoint import FORMAT
    from segment_deeplab.checkpoint import save as atomic_save
    from segment_deeplab.config import Config, ModelConfig
    from segment_deeplab.models import build_model

    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(
            model_variant="mobilenet_v3_small",
            num_classes=len(classes),
            aspp_channels=16,
            decoder_channels=16,
            low_level_channels=8,
        )
    )
    model = build_model(cfg.model)
    torch.nn.init.normal_(model.classifier.weight, std=2.0)
    torch.nn.init.normal_(model.classifier.bias, std=0.1)
    ckpt = {
        "format": FORMAT,
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "classes": classes,
        "ignore_index": 255,
        "dataset_hash": None,
        "step": 0,
    }
    atomic_save(ckpt, run / "best.pt")
    return run


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`, by relative path: a source left untouched
    hashes the same before and after."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_masks(dataset: Path) -> dict:
    """The class-id arrays of a dataset's masks/, by stem."""
    import numpy as np
    from PIL import Image

    return {p.stem: np.array(Image.open(p)) for p in sorted((dataset / "masks").glob("*.png"))}


def import_fails(capsys, args: list[str], out: Path, *names: str) -> str:
    """`deeplab import` exits 2 naming `names`, leaving no output or staging folder."""
    assert main(args) == 2
    err = capsys.readouterr().err
    for n in names:
        assert n in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "the staging folder was left behind"
    return err
