"""OpenVINO export, and the engine that runs a checkpoint's forward pass (`infer.runtimes`):
converted, parity-checked, timed, cached, and the same class maps from every engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_run
from PIL import Image

from segment_deeplab import Segmenter
from segment_deeplab.checkpoint import load_any, load_model, read_metadata, sniff_format
from segment_deeplab.cli import main
from segment_deeplab.export.runtime import ExportedModel, ExportError
from segment_deeplab.export.write import export
from segment_deeplab.infer import runtimes
from segment_deeplab.infer.fold import for_inference
from segment_deeplab.infer.runtimes import choose_runtime
from segment_deeplab.infer.tta import predict_labels

pytest.importorskip("openvino")

CLASSES = [
    {"id": 0, "name": "background", "color": [0, 0, 0]},
    {"id": 1, "name": "road", "color": [128, 64, 128]},
    {"id": 2, "name": "car", "color": [64, 0, 128]},
]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"), CLASSES)


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(runtimes.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _images(folder: Path, n: int, size=(72, 96)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n):
        arr = g.integers(0, 256, (*size, 3), dtype=np.uint8)
        arr[: size[0] // 2] //= 3  # some structure, so the classes differ across the image
        Image.fromarray(arr).save(folder / f"im{i:02d}.png")
    return folder


def _torch_labels(run_dir: Path, image: torch.Tensor) -> torch.Tensor:
    model = for_inference(load_model(run_dir)[0], CPU)
    return predict_labels(model, image[None])[0]


def test_openvino_export_writes_xml_and_bin_that_agree_with_pytorch(run_dir, tmp_path):
    out = tmp_path / "model.xml"
    result = export(run_dir, out)
    assert result.format == "openvino" and result.parity.passed, result.parity.summary()
    assert result.path == out and result.sidecar == tmp_path / "model.bin"
    assert out.is_file() and (tmp_path / "model.bin").stat().st_size > 10_000
    assert sniff_format(out) == "openvino"
    meta = read_metadata(out)
    assert [c["name"] for c in meta["classes"]] == ["background", "road", "car"]
    # Reloaded through the same door users take; another size than the traced one.
    loaded = load_any(out)
    assert loaded.format == "openvino" and isinstance(loaded.model, ExportedModel)
    image = torch.randint(0, 256, (3, 83, 117), dtype=torch.uint8)
    got = predict_labels(loaded.model, image[None])[0]
    want = _torch_labels(run_dir, image)
    assert (got == want).float().mean() >= 0.999
    # Nothing else was left in the folder (no scratch files).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]


def test_openvino_export_with_preprocessing_and_argmax_predicts_from_the_cli(run_dir, tmp_path):
    out = tmp_path / "baked.xml"
    assert main(["export", "--checkpoint", str(run_dir), "--output", str(out),
                 "--with-preprocessing", "--with-argmax"]) == 0  # fmt: skip
    images = _images(tmp_path / "images", 2)
    assert main(["predict", str(images), "--checkpoint", str(out), "--output",
                 str(tmp_path / "pred")]) == 0  # fmt: skip
    mask = np.asarray(Image.open(tmp_path / "pred" / "im00.png"))
    image = torch.from_numpy(np.asarray(Image.open(images / "im00.png")).copy()).permute(2, 0, 1)
    assert (torch.from_numpy(mask.astype(np.int64)) == _torch_labels(run_dir, image)).all()


def test_openvino_export_without_its_bin_is_named_not_a_traceback(run_dir, tmp_path, capsys):
    out = tmp_path / "model.xml"
    assert main(["export", "--checkpoint", str(run_dir), "--output", str(out)]) == 0
    # An earlier export is never replaced silently, the .bin neither.
    assert main(["export", "--checkpoint", str(run_dir), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "model.bin").unlink()
    code = main(["predict", str(_images(tmp_path / "im", 1)), "--checkpoint", str(out),
                 "--output", str(tmp_path / "pred")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "model.bin not found" in err and "Traceback" not in err


def test_auto_runtime_measures_once_then_loads_the_cached_winner(run_dir, cache):
    model = for_inference(load_model(run_dir)[0], CPU)
    first = choose_runtime(model, CPU, None, "auto", (64, 80))
    assert not first.cached
    assert set(first.speeds) >= {"torch", "onnxruntime", "openvino"}, first.describe()
    assert first.runtime == max(first.speeds, key=first.speeds.get)
    (entry,) = (cache / "runtimes").iterdir()
    record = json.loads((entry / "choice.json").read_text())
    assert record["runtime"] == first.runtime
    # Only the winner's files are kept.
    kept = {p.name for p in entry.iterdir()} - {"choice.json"}
    expected = {
        "torch": set(),
        "onnxruntime": {"model.onnx"},
        "openvino": {"model.xml", "model.bin"},
    }
    assert kept == expected[first.runtime]
    again = choose_runtime(for_inference(load_model(run_dir)[0], CPU), CPU, None, "auto")
    assert again.cached and again.runtime == first.runtime
    assert "chosen earlier" in again.describe()


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_every_engine_gives_the_pytorch_class_map(run_dir, cache, engine):
    # The engines run fp32, so PyTorch does too (`amp=auto` is bf16 on AMX CPUs).
    seg_torch = Segmenter.from_checkpoint(run_dir, device="cpu", runtime="torch", amp="off")
    seg = Segmenter.from_checkpoint(run_dir, device="cpu", runtime=engine)
    image = torch.randint(0, 256, (3, 90, 150), dtype=torch.uint8, generator=torch.Generator())
    got, want = seg.predict(image), seg_torch.predict(image)
    assert seg.runtime == engine and seg_torch.runtime == "torch"
    assert (got == want).mean() >= 0.999
    # TTA runs through the engine too (flip, two scales).
    seg_tta = Segmenter.from_checkpoint(run_dir, "cpu", scales=(0.75, 1.0), flip=True,
                                        runtime=engine)  # fmt: skip
    ref_tta = Segmenter.from_checkpoint(run_dir, "cpu", scales=(0.75, 1.0), flip=True,
                                        runtime="torch", amp="off")  # fmt: skip
    assert (seg_tta.predict(image) == ref_tta.predict(image)).mean() >= 0.999


def test_predict_cli_names_its_runtime_and_engines_write_the_same_masks(run_dir, tmp_path, cache,
                                                                        capsys):  # fmt: skip
    images = _images(tmp_path / "images", 3)
    masks = {}
    for engine in ("torch", "openvino"):
        out = tmp_path / engine
        code = main(["predict", str(images), "--checkpoint", str(run_dir), "--output", str(out),
                     "--runtime", engine, "--amp", "off", "--json", "--no-progress"])  # fmt: skip
        report = json.loads(capsys.readouterr().out)
        assert code == 0 and report["runtime"] == engine
        masks[engine] = [np.asarray(Image.open(out / f"im{i:02d}.png")) for i in range(3)]
    agree = np.mean([(a == b).mean() for a, b in zip(*masks.values(), strict=True)])
    assert agree >= 0.999
    # auto with a few images and nothing cached: no conversion, and it says why (fp32:
    # under bf16 autocast, on AMX CPUs, PyTorch runs whatever the count).
    main(["predict", str(images), "--checkpoint", str(run_dir), "--output",
          str(tmp_path / "auto"), "--amp", "off", "--no-progress"])  # fmt: skip
    assert "runtime: torch; 3 image(s)" in capsys.readouterr().err


def test_runtime_refusals_are_clear(run_dir, tmp_path, cache):
    model = for_inference(load_model(run_dir)[0], CPU)
    with pytest.raises(ExportError, match="unknown runtime 'tensorrtx'"):
        choose_runtime(model, CPU, None, "tensorrtx")
    onnx_file = tmp_path / "m.onnx"
    export(run_dir, onnx_file, opset=17)  # the older exporter: quicker, same file kind
    exported = load_any(onnx_file).model
    with pytest.raises(ExportError, match="this model is an export"):
        choose_runtime(exported, CPU, None, "openvino")
    assert choose_runtime(exported, CPU, None, "auto").runtime == "as saved"
    # bf16 autocast (AMX CPUs) keeps PyTorch: the engines here run fp32.
    assert choose_runtime(model, CPU, torch.bfloat16, "auto").runtime == "torch"


def test_an_unwritable_cache_still_converts(run_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(runtimes.CACHE_ENV, str(blocker))
    model = for_inference(load_model(run_dir)[0], CPU)
    choice = choose_runtime(model, CPU, None, "openvino")
    assert choice.runtime == "openvino" and blocker.read_text() == "not a folder"


def test_a_signal_after_openvino_models_come_and_go_is_handled(run_dir, tmp_path):
    """OpenVINO's CPU plugin gives the compiling thread a signal stack that it frees with
    the compiled model; a Python signal handler then crashed the process (SIGSEGV)."""
    import subprocess
    import sys

    # Compiled on the main thread, released on another: the release freed the main
    # thread's signal stack, and the SIGTERM below crashed the process.
    script = f"""
import gc, os, signal, threading, torch
from segment_deeplab import Segmenter
image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
box = [Segmenter.from_checkpoint({str(run_dir)!r}, device="cpu", runtime="openvino")]
box[0].predict(image)
def drop():
    box.clear()
    gc.collect()
t = threading.Thread(target=drop)
t.start()
t.join()
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
os.kill(os.getpid(), signal.SIGTERM)
print("handled", got)
"""
    env = {**__import__("os").environ, runtimes.CACHE_ENV: str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "handled [15]" in done.stdout


def test_a_refused_runtime_leaves_no_output_folder(run_dir, tmp_path, cache, capsys):
    onnx_file = tmp_path / "m.onnx"
    export(run_dir, onnx_file, opset=17)
    images = _images(tmp_path / "images", 1)
    out = tmp_path / "pred"
    code = main(["predict", str(images), "--checkpoint", str(onnx_file), "--output", str(out),
                 "--runtime", "openvino"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "this model is an export" in err and "Traceback" not in err
    assert not out.exists()
