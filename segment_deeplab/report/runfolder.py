"""What a run folder holds, read leniently: every piece may be missing.

A run may be interrupted (a truncated last line in metrics.jsonl, only last.pt), not
yet validated, never evaluated, or its dataset may have moved. Each reader returns
None (with a reason in `RunData.notes`) instead of raising, so the report can say
what is missing.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from segment_deeplab.checkpoint import CheckpointError, read_meta
from segment_deeplab.classes import ClassInfo, from_dicts
from segment_deeplab.data.spec import DatasetError, DatasetSpec, open_dataset

CHECKPOINTS = ("best.pt", "last.pt")


@dataclass
class RunData:
    run_dir: Path
    train: list[dict[str, Any]] = field(default_factory=list)  # {step, loss, lr, ...}
    val: list[dict[str, Any]] = field(default_factory=list)  # {step, miou, iou, ...}
    config_text: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    # best.pt / last.pt (or an evaluated file's absolute path) -> meta without weights
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    classes: list[ClassInfo] = field(default_factory=list)
    ignore_index: int = 255
    spec: DatasetSpec | None = None
    dataset_ref: str | None = None  # the dataset as recorded, for commands in notes
    eval_dir: Path | None = None
    eval_metrics: dict[str, Any] | None = None
    confusion: tuple[list[str], np.ndarray] | None = None
    per_image: list[tuple[str, float]] | None = None
    notes: dict[str, str] = field(default_factory=dict)  # piece -> why it is missing
    missing: list[str] = field(default_factory=list)  # what the report could not show

    @property
    def checkpoint(self) -> Path | None:
        """best.pt, else last.pt (else the evaluated file): the weights the gallery uses."""
        for name in (*CHECKPOINTS, *self.checkpoints):
            if name in self.checkpoints:
                return self.run_dir / name  # an absolute name stays itself
        return None


def read_metrics_log(path: Path) -> tuple[list[dict], list[dict], int]:
    """(train records, val records, unreadable lines) of metrics.jsonl.

    A resumed run logs the steps after its last checkpoint twice; the later record wins.
    """
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            bad += 1  # e.g. the half-written last line of a killed run
            continue
        if isinstance(rec.get("val"), dict):
            val[step] = {"step": step, **rec["val"]}
        elif "loss" in rec:
            train[step] = rec
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)], bad


def checkpoint_meta(path: Path) -> dict[str, Any] | None:
    """A checkpoint's dict without its weights, or None when it cannot be read."""
    try:
        return read_meta(path)
    except CheckpointError:  # any unreadable file is reported as missing
        return None


def find_eval_dir(run: Path) -> Path | None:
    """The run's evaluation output: `eval_val/`, another `eval_*/`, or a sibling folder
    whose metrics.json names this run as its checkpoint (e.g. `deeplab eval --output`)."""
    if (run / "eval_val" / "metrics.json").is_file():
        return run / "eval_val"
    found = sorted(run.glob("eval_*/metrics.json"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1].parent
    siblings = []
    for path in run.parent.glob("*/metrics.json"):
        try:
            recorded = json.loads(path.read_text()).get("checkpoint")
        except (OSError, ValueError, AttributeError):
            continue
        # eval records the checkpoint as typed: a run folder or a file inside one.
        ckpt = Path(recorded or "").resolve()
        if recorded and run.resolve() in (ckpt, ckpt.parent):
            siblings.append(path)
    siblings.sort(key=lambda p: p.stat().st_mtime)
    return siblings[-1].parent if siblings else None


def read_eval(eval_dir: Path, data: RunData) -> None:
    """metrics.json, confusion_matrix.csv and per_image.csv of a `deeplab eval` output."""
    data.eval_dir = eval_dir
    try:
        data.eval_metrics = json.loads((eval_dir / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        data.notes["eval"] = f"no readable metrics.json in {eval_dir} ({type(e).__name__})"
    try:
        with (eval_dir / "confusion_matrix.csv").open(newline="") as f:
            rows = list(csv.reader(f))
        names = rows[0][1:]
        mat = np.array([[int(v) for v in r[1:]] for r in rows[1:]], dtype=np.int64)
        if mat.shape == (len(names), len(names)):
            data.confusion = (names, mat)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with (eval_dir / "per_image.csv").open(newline="") as f:
            data.per_image = [
                (r["stem"], float(r["miou"])) for r in csv.DictReader(f) if r.get("miou")
            ]
    except (OSError, ValueError, KeyError):
        pass


def _open_dataset(data: RunData) -> None:
    """The dataset from eval's record, the checkpoint's, or the run's own dataset.yaml."""
    refs = []
    if data.eval_metrics and data.eval_metrics.get("dataset"):
        refs.append(str(data.eval_metrics["dataset"]))
    for meta in data.checkpoints.values():
        if meta.get("dataset_path"):
            refs.append(str(meta["dataset_path"]))
    if (data.run_dir / "dataset.yaml").is_file():
        refs.append(str(data.run_dir / "dataset.yaml"))
    data.dataset_ref = refs[0] if refs else None
    errors = []
    for ref in dict.fromkeys(refs):
        try:
            data.spec = open_dataset(ref)
            data.dataset_ref = ref
            return
        except DatasetError as e:
            errors.append(str(e))
    if errors:
        data.notes["dataset"] = f"the dataset cannot be opened ({errors[0]}); was it moved?"
    else:
        data.notes["dataset"] = "the run does not record its dataset"


def read_run(run_dir: str | Path, eval_dir: str | Path | None = None) -> RunData:
    """Everything the report shows, from the run folder (and its evaluation output)."""
    run = Path(run_dir)
    data = RunData(run)
    log = run / "metrics.jsonl"
    if log.is_file():
        data.train, data.val, bad = read_metrics_log(log)
        if bad:
            data.notes["log"] = f"{bad} unreadable line(s) in metrics.jsonl were skipped"
    else:
        data.notes["log"] = "no metrics.jsonl (training has not logged a step yet)"
    found = Path(eval_dir) if eval_dir is not None else find_eval_dir(run)
    if found is not None:
        read_eval(found, data)
    for name in CHECKPOINTS:
        meta = checkpoint_meta(run / name) if (run / name).is_file() else None
        if meta is not None:
            data.checkpoints[name] = meta
    recorded = Path(str((data.eval_metrics or {}).get("checkpoint") or ""))
    if not data.checkpoints and recorded.is_file():  # an evaluated checkpoint outside a run
        meta = checkpoint_meta(recorded)
        if meta is not None:
            data.checkpoints[str(recorded.resolve())] = meta
    if (run / "config.yaml").is_file():
        data.config_text = (run / "config.yaml").read_text()
        data.config = yaml.safe_load(data.config_text) or {}
    elif data.checkpoints:
        data.config = next(iter(data.checkpoints.values())).get("config") or {}
        data.config_text = yaml.safe_dump(data.config, sort_keys=False) if data.config else None
    if data.checkpoints:
        meta = next(iter(data.checkpoints.values()))
        data.classes = from_dicts(meta["classes"])
        data.ignore_index = int(meta.get("ignore_index", 255))
    _open_dataset(data)
    if data.spec is not None and not data.classes:
        data.classes, data.ignore_index = list(data.spec.classes), data.spec.ignore_index
    return data
