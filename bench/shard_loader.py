"""The training loader from WebDataset shards against the same loader from folders.

    python bench/shard_loader.py [--rounds 3] [--batches 20]

CamVid is prepared twice into runs/bench/ (once as folders, once with `--shards 8`,
same seed and split). Both loaders are built as `fit()` builds them, with the recipe's
train preset (decode, random scale, crop, flip; batch 8 at 256x256): images/s out of the
loader after its first batch, for 0 and 2 worker processes, in alternating rounds
(median). The shards are local files here, read through fsspec as remote ones are.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CAMVID_SOURCE, ROOT, machine, prepared_camvid  # noqa: E402

from segment_deeplab.config import load_config  # noqa: E402
from segment_deeplab.data.dataset import build_loader, build_stream_loader  # noqa: E402
from segment_deeplab.data.spec import open_dataset  # noqa: E402
from segment_deeplab.train import schedule  # noqa: E402


def sharded_camvid(cache: Path) -> Path:
    """CamVid prepared with --shards 8 into `cache` (once); returns the shard folder."""
    if not (cache / "shards" / "manifest.json").is_file():
        deeplab = Path(sys.executable).parent / "deeplab"
        cmd = [str(deeplab), "prepare", CAMVID_SOURCE, "--spec", str(ROOT / "datasets/camvid.yaml")]
        subprocess.run([*cmd, "--output", str(cache), "--shards", "8"], check=True)
    return cache / "shards"


def loader(cfg, spec, workers: int):
    cfg.data.workers = workers
    if spec.manifest is not None:
        stream, out = build_stream_loader(spec, cfg.data, seed=0, rank=0, world=1, device="cpu")
        stream.set_epoch(0, 0)
        return out
    n = len(spec.read_split("train"))
    sampler = schedule.EpochBatchSampler(n, cfg.data.batch_size, 0)
    return build_loader(spec, "train", cfg.data, True, device="cpu", batch_sampler=sampler)


def delivered(cfg, spec, workers: int, batches: int) -> float:
    it = iter(loader(cfg, spec, workers))
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += next(it)[0].shape[0]
    return n / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/deeplabv3plus_resnet18_camvid_256.yaml")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=20)
    args = p.parse_args()
    cfg = load_config(args.config)
    folder = open_dataset(prepared_camvid(ROOT / "runs/bench/camvid"))
    shards = open_dataset(sharded_camvid(ROOT / "runs/bench/camvid_shards"))
    rows = {}
    for _ in range(args.rounds):
        for workers in (0, 2):
            for name, spec in (("folders", folder), ("shards", shards)):
                rows.setdefault((workers, name), []).append(
                    delivered(cfg, spec, workers, args.batches)
                )
    print(f"{machine()}; median of {args.rounds} alternating rounds of {args.batches} batches")
    print()
    print("| loader workers | from folders, img/s | from shards, img/s | shards / folders |")
    print("|---:|---:|---:|---:|")
    for workers in (0, 2):
        f = statistics.median(rows[(workers, "folders")])
        s = statistics.median(rows[(workers, "shards")])
        print(f"| {workers} | {f:.0f} | {s:.0f} | {s / f:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
