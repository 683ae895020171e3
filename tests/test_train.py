"""Training: loss goes down, exact resume, refusals, signals, NaN, two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, stop_at

from segment_deeplab.checkpoint import load_file, load_model
from segment_deeplab.config import ConfigError, load_config
from segment_deeplab.data.spec import open_dataset
from segment_deeplab.losses import auto_class_weights
from segment_deeplab.train import setup as setup_mod
from segment_deeplab.train.loop import TrainingError, fit


def _cfg(*extra: str):
    return load_config(None, TINY + list(extra))


def _losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def test_a_few_steps_reduce_the_loss(dataset, tmp_path):
    spec = open_dataset(dataset)
    result = fit(_cfg("train.steps=24"), spec, tmp_path / "run", progress=False)
    losses = _losses(tmp_path / "run")
    assert result.step == 24 and len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    for name in ("config.yaml", "last.pt", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file()
    model, cfg, ck = load_model(tmp_path / "run" / "last.pt")
    assert cfg.model.num_classes == spec.num_classes and ck["step"] == 24
    assert [c["name"] for c in ck["classes"]] == spec.class_names


def test_a_spent_time_budget_still_trains_min_steps(dataset, tmp_path):
    """A budget picked on a fast machine, on a slow one: it ends at once (one step), or,
    with train.min_steps, not before that many steps, the LR decaying over them."""
    spec = open_dataset(dataset)
    assert fit(_cfg("train.time=0.001"), spec, tmp_path / "a", progress=False).step == 1
    cfg = _cfg("train.time=0.001", "train.min_steps=5", "train.log_every=1")
    assert fit(cfg, spec, tmp_path / "b", progress=False).step == 5
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").open()) if "lr" in r]
    assert len(lrs) == 5 and lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1] > 0


def test_class_weights_are_corrected_for_in_the_saved_model(dataset, tmp_path):
    spec = open_dataset(dataset)
    cfg = _cfg("train.steps=2", "train.class_weights=auto")
    fit(cfg, spec, tmp_path / "run", progress=False)
    model, saved, _ = load_model(tmp_path / "run" / "last.pt")
    weights = torch.tensor(auto_class_weights(spec.stats["class_pixels"]))
    expect = -(weights.log() - weights.log().mean())
    assert saved.model.logit_bias == pytest.approx(expect.tolist(), abs=1e-5)
    assert model.logit_bias.flatten().tolist() == pytest.approx(expect.tolist(), abs=1e-5)
    # no correction without weights, or when switched off
    fit(_cfg("train.steps=1"), spec, tmp_path / "plain", progress=False)
    assert load_model(tmp_path / "plain" / "last.pt")[1].model.logit_bias is None
    off = _cfg("train.steps=1", "train.class_weights=auto", "train.prior_correction=0")
    fit(off, spec, tmp_path / "off", progress=False)
    assert load_model(tmp_path / "off" / "last.pt")[1].model.logit_bias is None


def _lrs(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in recs if "lr" in r]


def test_resume_gives_the_weights_of_an_uninterrupted_run(dataset, tmp_path, monkeypatch):
    spec = open_dataset(dataset)
    extra = ("train.steps=8", "train.warmup_steps=2", "model.dropout=0.3")
    fit(_cfg(*extra), spec, tmp_path / "full", progress=False)

    stop_at(monkeypatch, 3)
    stopped = fit(_cfg(*extra), spec, tmp_path / "cut", progress=False)
    assert stopped.interrupted and stopped.step == 3
    monkeypatch.undo()
    # the interrupted checkpoint loads on its own
    assert load_model(tmp_path / "cut" / "last.pt")[2]["step"] == 3
    resumed = fit(_cfg(*extra), spec, tmp_path / "cut", resume=True, progress=False)
    assert resumed.step == 8

    full = load_file(tmp_path / "full" / "last.pt")["model"]
    cut = load_file(tmp_path / "cut" / "last.pt")["model"]
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    assert _lrs(tmp_path / "full") == _lrs(tmp_path / "cut")


def test_resume_with_a_changed_model_refuses_listing_differences(dataset, tmp_path):
    spec = open_dataset(dataset)
    fit(_cfg("train.steps=2"), spec, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match=r"model.output_stride: 16 -> 8"):
        fit(_cfg("train.steps=4", "model.output_stride=8"), spec, tmp_path / "run", resume=True)


def test_batch_of_one_from_scratch_is_refused_with_the_ways_out(dataset, tmp_path):
    spec = open_dataset(dataset)
    with pytest.raises(ConfigError, match="data.batch_size=2 or more.*train.freeze_bn=true"):
        fit(_cfg("train.steps=1", "data.batch_size=1"), spec, tmp_path / "one", progress=False)
    assert not (tmp_path / "one" / "last.pt").exists()
    ok = _cfg("train.steps=1", "data.batch_size=1", "train.freeze_bn=true")
    fit(ok, spec, tmp_path / "ok", progress=False)
    assert (tmp_path / "ok" / "last.pt").is_file()


def test_new_run_into_an_existing_run_folder_refuses(dataset, tmp_path):
    spec = open_dataset(dataset)
    fit(_cfg("train.steps=1"), spec, tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        fit(_cfg("train.steps=1"), spec, tmp_path / "run", progress=False)


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    spec = open_dataset(dataset)
    real = setup_mod.build_loss

    def poisoned(*a, **k):
        fn, calls = real(*a, **k), {"n": 0}

        def loss(logits, target):
            calls["n"] += 1
            value = fn(logits, target)
            return value * float("nan") if calls["n"] == 5 else value

        return loss

    monkeypatch.setattr(setup_mod, "build_loss", poisoned)
    with pytest.raises(TrainingError, match="nan at step 4; the last good checkpoint is"):
        fit(_cfg("train.steps=10", "train.checkpoint_every=2"), spec, tmp_path / "run")
    ck = load_file(tmp_path / "run" / "last.pt")
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_sigterm_saves_a_loadable_checkpoint(dataset, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "segment_deeplab", "train", "--data", str(dataset)]
    cmd += ["--output", str(run), "--no-progress", "--time", "10m", *TINY]
    proc = subprocess.Popen(cmd, env=_cli_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    model, cfg, ck = load_model(run / "last.pt")
    assert ck["step"] >= 1


def test_two_processes_with_gloo_stay_in_sync(dataset, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["-m", "segment_deeplab", "train", "--data", str(dataset), "--output", str(run)]
    cmd += ["--no-progress", "--device", "cpu", *TINY, "data.batch_size=2", "train.steps=4"]
    cmd += ["train.val_every=4"]
    proc = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sums = [r["rank_weight_checksums"] for r in recs if "rank_weight_checksums" in r]
    assert len(sums) == 1 and len(sums[0]) == 2 and sums[0][0] == sums[0][1]
    assert any("val" in r for r in recs)
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert load_file(run / "last.pt")["step"] == 4


KEEP_MEMORY_CHILD = """
import resource, sys, torch
from segment_deeplab.device import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None

def step():  # tensors over glibc's mmap threshold, made, touched and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(n << 20, dtype=torch.uint8).fill_(1) for n in (48, 64, 33, 96, 40)]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(took, sum([step() for _ in range(8)][-3:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_cpu_training_keeps_freed_memory_for_the_next_step():
    """Once keep_freed_memory is on, a step's large tensors reuse the pages the previous
    step freed (few page faults); by default glibc unmaps them and faults them in again."""

    def run(mode: str) -> tuple[str, int]:
        done = subprocess.run(
            [sys.executable, "-c", KEEP_MEMORY_CHILD, mode],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        took, faults = done.stdout.split()
        return took, int(faults)

    took, kept = run("keep")
    _, default = run("system")
    assert took == "True"
    assert default > 3 * 50_000 and kept < default / 10, (default, kept)  # 281 MiB a step
