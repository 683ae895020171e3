"""Accuracy for the same compute: CamVid from scratch, a fixed CPU budget per recipe.

    python bench/camvid_accuracy.py compare --data CAMVID_PREPARED --budget 20m --out DIR
    python bench/camvid_accuracy.py run --recipe project --config configs/X.yaml \
        --data CAMVID_PREPARED --budget 5m --out DIR [key=value ...]

`compare` trains the project's recipe and the peer recipe side by side, each pinned to
one core (taskset -c 0 / -c 1, one thread), so machine-wide slowdowns hit both alike;
both are then evaluated by the project's `evaluate` on the same held-out split at full
resolution (480x360). The peer recipe is torchvision's reference recipe on smp's
DeepLabV3Plus (resnet18 encoder): SGD momentum 0.9, lr 0.01, wd 1e-4, poly decay over
the budget, random scale 0.5-2.0, crop 320, flip, batch 8. Data loading runs in the
training process (workers 0) for both, inside the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_CONFIG = "configs/deeplabv3plus_resnet18_camvid_256.yaml"


def _parse_budget(text: str) -> float:
    from segment_deeplab.train.schedule import parse_duration

    return float(parse_duration(text))


def run_project(args: argparse.Namespace) -> dict:
    """`deeplab train` with the config, the budget and overrides; val only at the end."""
    from segment_deeplab.config import load_config
    from segment_deeplab.data.spec import open_dataset
    from segment_deeplab.train.loop import fit

    overrides = [
        f"train.time={args.budget}",
        "data.workers=0",
        "train.val_every=1000000000",
        "train.checkpoint_every=1000000000",
        f"train.seed={args.seed}",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    spec = open_dataset(args.data)
    out = Path(args.out)
    result = fit(cfg, spec, out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val"] for r in records if "val" in r][-1]
    train = [r for r in records if "images_per_s" in r]
    return {
        "recipe": "project",
        "config": args.config,
        "overrides": args.overrides,
        "steps": result.step,
        "images": result.step * cfg.data.batch_size,
        "train_s": train[-1]["elapsed_s"] if train else None,
        "miou": val["miou"],
        "iou": val["iou"],
        "class_names": val["class_names"],
    }


def run_peer(args: argparse.Namespace) -> dict:
    """The torchvision-reference loop on smp DeepLabV3Plus, LR decayed over the budget."""
    from peer_smp import (
        NormalizedPeer,
        build_peer,
        normalize_batch,
        peer_optimizer,
        peer_train_step,
        peer_train_transforms,
    )

    from segment_deeplab.data.dataset import SegmentationFolder
    from segment_deeplab.data.spec import open_dataset
    from segment_deeplab.infer.evaluate import evaluate

    spec = open_dataset(args.data)
    torch.manual_seed(args.seed)
    model = build_peer(args.peer_encoder, spec.num_classes)
    optimizer = peer_optimizer(model, lr=0.01)
    train_set = SegmentationFolder(
        spec, "train", transform=peer_train_transforms(360, 320, (0.5, 2.0), spec.ignore_index)
    )
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=8, shuffle=True, drop_last=True, num_workers=0, generator=g
    )
    budget = _parse_budget(args.budget)
    model.train()
    step, start, done = 0, time.perf_counter(), False
    while not done:
        for images, masks in loader:
            frac = min((time.perf_counter() - start) / budget, 1.0)
            for group in optimizer.param_groups:  # PolynomialLR(power=0.9) over the budget
                group["lr"] = 0.01 * (1 - frac) ** 0.9
            peer_train_step(model, normalize_batch(images), masks, optimizer, spec.ignore_index)
            step += 1
            if time.perf_counter() - start >= budget:
                done = True
                break
    train_s = time.perf_counter() - start
    val = evaluate(
        NormalizedPeer(model),
        SegmentationFolder(spec, "val"),
        spec.num_classes,
        spec.ignore_index,
        progress=False,
        class_names=spec.class_names,
    )
    return {
        "recipe": "peer",
        "encoder": args.peer_encoder,
        "steps": step,
        "images": step * 8,
        "train_s": round(train_s, 1),
        "miou": val["miou"],
        "iou": val["iou"],
        "class_names": val["class_names"],
    }


def cmd_run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    result = run_project(args) if args.recipe == "project" else run_peer(args)
    result.update(budget=args.budget, threads=torch.get_num_threads(), seed=args.seed)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.recipe}: mIoU {result['miou']:.4f} after {result['steps']} steps")
    return 0


def _child(recipe: str, core: int, args: argparse.Namespace, out: Path) -> subprocess.Popen:
    cmd = ["taskset", "-c", str(core), sys.executable, __file__, "run", "--recipe", recipe]
    cmd += ["--data", args.data, "--budget", args.budget, "--out", str(out), "--threads", "1"]
    cmd += ["--config", args.config, "--seed", str(args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = (out.parent / f"{out.name}.log").open("w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def table(project: dict, peer: dict) -> str:
    """Markdown: mIoU and per-class IoU (percent) of both recipes."""
    names = project["class_names"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = [
        "| | " + " | ".join(names) + " | **mIoU** | steps | images seen |",
        "|---" * (len(names) + 4) + "|",
    ]
    for label, r in (("segment-deeplab", project), ("peer (smp + torchvision ref.)", peer)):
        cells = " | ".join(pct(v) for v in r["iou"])
        lines.append(f"| {label} | {cells} | **{pct(r['miou'])}** | {r['steps']} | {r['images']} |")
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> int:
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    runs = {"project": root / "project", "peer": root / "peer"}
    for out in runs.values():
        if out.exists() and (out / "last.pt").exists():
            raise SystemExit(f"{out} holds an earlier run; choose another --out")
    procs = {name: _child(name, core, args, out) for core, (name, out) in enumerate(runs.items())}
    for name, p in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"the {name} run failed; see {runs[name]}.log")
    results = {n: json.loads((o / "result.json").read_text()) for n, o in runs.items()}
    text = table(results["project"], results["peer"])
    gap = 100 * (results["project"]["miou"] - results["peer"]["miou"])
    text += f"\n\nmIoU gap: {gap:+.1f} points ({args.budget} per recipe, one core each)\n"
    (root / "table.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "compare"):
        s = sub.add_parser(name)
        s.add_argument("--data", required=True, help="prepared CamVid (dataset.yaml)")
        s.add_argument("--budget", default="20m", help="training wall clock per recipe")
        s.add_argument("--out", required=True)
        s.add_argument("--config", default=DEFAULT_CONFIG, help="the project's recipe")
        s.add_argument("--seed", type=int, default=0)
    run = sub.choices["run"]
    run.add_argument("--recipe", choices=["project", "peer"], required=True)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--peer-encoder", default="resnet_18")
    run.add_argument("overrides", nargs="*", help="key=value config overrides (project)")
    args = p.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
