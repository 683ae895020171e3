"""Training and evaluating from shards: local, over real HTTP, and from an S3 API.

The shards are written by `deeplab prepare --shards`; the HTTP server is Python's own
(`http.server`) on a loopback port, the S3 API moto's server, read through s3fs, the
same code path a user's `s3://` bucket takes.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
from helpers import SMALL, make_dataset, stop_at

from segment_deeplab.checkpoint import load_file
from segment_deeplab.cli import main
from segment_deeplab.config import Config, load_config
from segment_deeplab.data.spec import open_dataset
from segment_deeplab.data.stream import ShardStream, StreamLoader
from segment_deeplab.train.loop import fit

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = [*SMALL, "data.batch_size=2", "data.crop_size=[48,48]", "data.workers=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A synthetic dataset of 16 pairs written as 4 train shards and 1 val shard."""
    root = tmp_path_factory.mktemp("sharded")
    make_dataset(root / "ds")
    out = root / "ds"
    assert main(["prepare", str(out), "--val-fraction", "0.25", "--shards", "4"]) == 0
    return out / "shards"


def _stream(shards: Path, **kw) -> ShardStream:
    spec = open_dataset(shards)
    args = {"batch_size": 2, "seed": 3, "workers": 0, "buffer": 4, **kw}
    return ShardStream(spec.manifest, "train", None, **args)


def _batches(stream: ShardStream, epoch: int, start: int = 0) -> list[torch.Tensor]:
    from torch.utils.data import DataLoader

    stream.set_epoch(epoch, start)
    loader = DataLoader(stream, batch_size=2, drop_last=True, num_workers=stream.workers)
    loader = StreamLoader(stream, loader)
    return [images.clone() for images, _ in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_gives_the_batches_of_an_uninterrupted_one(shards, workers):
    full = _batches(_stream(shards, workers=workers), epoch=1)
    assert len(full) == _stream(shards, workers=workers).batches_per_epoch >= 4
    resumed = _batches(_stream(shards, workers=workers), epoch=1, start=3)
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed, strict=True):
        assert torch.equal(a, b)
    other_epoch = _batches(_stream(shards, workers=workers), epoch=2)
    assert not all(torch.equal(a, b) for a, b in zip(full, other_epoch, strict=False))


def test_ranks_read_disjoint_shards_and_take_equal_batches(shards):
    spec = open_dataset(shards)
    streams = [_stream(shards, rank=r, world=2) for r in range(2)]
    mine = [{k for s in st.mine for k in s.keys} for st in streams]
    assert not mine[0] & mine[1]
    assert mine[0] | mine[1] == set(spec.read_split("train"))
    assert streams[0].batches_per_epoch == streams[1].batches_per_epoch
    counts = [len(_batches(st, epoch=0)) for st in streams]
    assert counts[0] == counts[1] == streams[0].batches_per_epoch


def test_more_processes_than_shards_is_refused_naming_the_fix(shards):
    with pytest.raises(Exception, match=r"4 shards for 8 processes.*--shards"):
        _stream(shards, rank=0, world=8)


def _cfg(*overrides: str) -> Config:
    return load_config(None, [*RUN, "train.log_every=1", "train.val_every=1000", *overrides])


def test_resume_mid_epoch_on_shards_gives_the_weights_of_an_uninterrupted_run(
    shards, tmp_path, monkeypatch
):
    spec = open_dataset(shards)
    extra = ("train.steps=7", "train.warmup_steps=2")  # 6 batches an epoch: stops in epoch 0
    fit(_cfg(*extra), spec, tmp_path / "full", progress=False)
    stop_at(monkeypatch, 4)
    stopped = fit(_cfg(*extra), spec, tmp_path / "cut", progress=False)
    assert stopped.interrupted and stopped.step == 4
    monkeypatch.undo()
    assert fit(_cfg(*extra), spec, tmp_path / "cut", resume=True, progress=False).step == 7
    full = load_file(tmp_path / "full" / "last.pt")["model"]
    cut = load_file(tmp_path / "cut" / "last.pt")["model"]
    for k in full:
        assert torch.equal(full[k], cut[k]), k


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_url(shards):
    """The shard folder served over HTTP on a loopback port."""
    handler = functools.partial(_Quiet, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _train_and_eval(data: str, tmp_path: Path) -> dict:
    run = tmp_path / "run"
    argv = ["train", "--data", data, "--output", str(run), "--no-progress", "--steps", "2"]
    assert main([*argv, *RUN, "train.val_every=2"]) == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val" in m for m in metrics)
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(run), "--data", data, "--output", str(out)]
    assert main([*argv, "--no-progress", "--json"]) == 0
    per_image = (out / "per_image.csv").read_text().splitlines()[1:]
    return {**json.loads((out / "metrics.json").read_text()), "per_image": per_image}


def test_train_and_eval_read_shards_over_http(shards, http_url, tmp_path):
    remote = _train_and_eval(f"{http_url}/manifest.json", tmp_path / "http")
    local = _train_and_eval(str(shards), tmp_path / "local")
    assert remote["miou"] == pytest.approx(local["miou"])  # same batches, same model
    assert len(remote["per_image"]) == 4


def test_a_missing_shard_on_the_server_names_its_url(shards, http_url, tmp_path, capsys):
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["url"] = "gone-000000.tar"
    broken = shards / "manifest_broken.json"
    broken.write_text(json.dumps(manifest))
    try:
        argv = ["train", "--data", f"{http_url}/manifest_broken.json", "--no-progress"]
        argv += ["--output", str(tmp_path / "run"), "--steps", "1", *RUN]
        assert main(argv) == 2
    finally:
        broken.unlink()
    assert f"{http_url}/gone-000000.tar" in capsys.readouterr().err


@pytest.fixture
def s3_url(shards, monkeypatch):
    """The shard folder uploaded to a bucket of moto's S3 server on a loopback port."""
    pytest.importorskip("s3fs", reason="s3fs reads s3:// URLs (the dev extra has it)")
    moto_server = pytest.importorskip("moto.server", reason="moto serves the S3 API")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,  # fsspec's per-protocol configuration
    }.items():
        monkeypatch.setenv(key, value)
    import fsspec.config
    import s3fs

    fsspec.config.set_conf_env(fsspec.config.conf)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("bucket")
    fs.put(str(shards) + "/", "bucket/camvid/", recursive=True)
    yield "s3://bucket/camvid"
    fsspec.config.conf.pop("s3", None)
    server.stop()


def test_train_and_eval_read_shards_from_an_s3_api(s3_url, tmp_path):
    result = _train_and_eval(s3_url, tmp_path)
    assert len(result["per_image"]) == 4


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_meet_at_a_c10d_rendezvous_and_read_disjoint_shards(shards, tmp_path):
    """Two `torchrun --nnodes 2` launchers on one machine, one process each, as two
    machines would run them (each with its own --node-rank)."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        cmd += ["--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes", "-m", "segment_deeplab"]
        cmd += ["train", "--data", str(shards), "--output", str(run), "--no-progress"]
        cmd += ["--device", "cpu", *RUN, "train.steps=3", "train.val_every=3"]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    read = next(r["rank_shards"] for r in records if "rank_shards" in r)
    assert len(read) == 2 and read[0] and read[1] and not set(read[0]) & set(read[1])
    sums = next(r["rank_weight_checksums"] for r in records if "rank_weight_checksums" in r)
    assert len(sums) == 2 and sums[0] == sums[1]
    assert any("val" in r for r in records)
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "report.html"):
        assert (run / name).is_file(), name
    assert load_file(run / "last.pt")["step"] == 3
