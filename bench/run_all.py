"""Every benchmark behind BENCHMARKS.md, in one run; `make bench` calls this.

    python bench/run_all.py              # throughput, loader, eval speed, memory (~6 min)
    python bench/run_all.py --quick      # the same, fewer rounds and resnet_18 only (~3 min)
    python bench/run_all.py --accuracy   # only the 20-minute CamVid comparison (~25 min)

Tables go to stdout and to runs/bench/<name>.md; CamVid (CAMVID=/path, default the
shared copy) is prepared once into runs/bench/camvid. Needs the bench extra
(`pip install -e '.[bench]'`, which `make bench` does).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, SEQUENCE, machine, prepared_camvid  # noqa: E402

BENCH = Path(__file__).resolve().parent
RECIPE = "configs/deeplabv3plus_resnet18_camvid_256.yaml"


def _run(name: str, args: list[str], out: Path) -> str:
    print(f"== {name}: {' '.join(args)}", file=sys.stderr, flush=True)
    res = subprocess.run(
        [sys.executable, str(BENCH / args[0]), *args[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    (out / f"{name}.md").write_text(res.stdout)
    print(res.stdout, flush=True)
    return res.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds, resnet_18 only")
    p.add_argument("--accuracy", action="store_true", help="the CamVid comparison only")
    p.add_argument("--budget", default="20m", help="training budget per recipe (--accuracy)")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    data = str(prepared_camvid(out / "camvid"))
    print(machine(), file=sys.stderr)
    if args.accuracy:
        # Whole video sequences held out: the figure users will see on new footage.
        data = str(prepared_camvid(out / "camvid_sequences", group_by=SEQUENCE))
        run = out / f"camvid_sequences_{args.budget}"
        _run(
            "camvid_accuracy",
            ["camvid_accuracy.py", "compare", "--data", data, "--budget", args.budget,
             "--config", RECIPE, "--out", str(run)],
            out,
        )  # fmt: skip
        return 0
    rounds = ["--rounds", "3"] if args.quick else ["--rounds", "5"]
    backbones = ["resnet_18"] if args.quick else ["resnet_18", "resnet_50"]
    quick = ["--quick"] if args.quick else []
    _run("throughput", ["throughput.py", "--backbones", *backbones, *rounds, *quick], out)
    _run("loader", ["loader.py", "--data", data, "--config", RECIPE], out)
    _run("eval_speed", ["eval_speed.py", "--data", data, "--config", RECIPE, *rounds], out)
    _run("memory", ["memory.py", "--config", RECIPE], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
