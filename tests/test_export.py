"""Export: ONNX / TorchScript / safetensors parity at other sizes, metadata, CLI, Python API."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import make_run
from PIL import Image

from segment_deeplab import Segmenter
from segment_deeplab.checkpoint import load_model, load_safetensors, read_metadata
from segment_deeplab.cli import main
from segment_deeplab.export import write as export_mod
from segment_deeplab.export.runtime import ExportError
from segment_deeplab.export.write import DeployModel, export
from segment_deeplab.infer.fold import for_inference as prepare_model
from segment_deeplab.infer.tta import predict_labels

CLASSES = [
    {"id": 0, "name": "background", "color": [0, 0, 0]},
    {"id": 1, "name": "cat", "color": [255, 0, 0]},
    {"id": 2, "name": "dog", "color": [0, 255, 0]},
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder with best.pt: a tiny DeepLabV3+ with weights that give clear argmaxes."""
    return make_run(tmp_path_factory.mktemp("run"), CLASSES)


@pytest.fixture(scope="module")
def model(run_dir):
    return load_model(run_dir)[0]


@pytest.fixture(scope="module")
def onnx_raw(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = export(run_dir / "best.pt", out, fmt="onnx")
    assert result.path == out and result.parity.passed, result.parity.summary()
    assert [97, 131] in result.parity.sizes  # an odd size, other than the traced one
    print(result.parity.summary())
    return out


@pytest.fixture(scope="module")
def onnx_baked(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "baked.onnx"
    result = export(run_dir, out, preprocessing=True, argmax=True)
    assert result.parity.passed and result.parity.max_abs_diff is None
    print(result.parity.summary())
    return out


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 (3, h, w) with smooth regions, so argmaxes are not all one class."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8, w // 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")
    return (x[0] * 255).round().to(torch.uint8)


def test_onnx_dynamic_batch_and_size(onnx_raw, model):
    sess = ort.InferenceSession(str(onnx_raw), providers=["CPUExecutionProvider"])
    for b, h, w in [(2, 64, 80), (2, 97, 131)]:
        x = torch.stack([_image(h, w, i) for i in range(b)]).float() / 255
        with torch.no_grad():
            ref = model(x)
        out = sess.run(None, {"image": x.numpy()})[0]
        assert out.shape == (b, 3, h, w)
        assert np.abs(out - ref.numpy()).max() < 1e-3 * max(1.0, ref.abs().max().item())
        assert (out.argmax(1) == ref.argmax(1).numpy()).mean() > 0.999
    dims = onnx.load(str(onnx_raw)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]


def test_onnx_metadata_holds_classes_and_normalisation(onnx_raw, model):
    props = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_raw)).metadata_props}
    assert props["classes"] == CLASSES and props["ignore_index"] == 255
    assert props["mean"] == pytest.approx(model.mean.flatten().tolist())
    assert props["std"] == pytest.approx(model.std.flatten().tolist())
    assert props["input"]["layout"] == "NCHW" and props["output"]["name"] == "logits"
    assert read_metadata(onnx_raw)["config"]["model"]["model_variant"] == "mobilenet_v3_small"


def test_baked_preprocessing_and_argmax_match_pytorch(onnx_baked, model):
    sess = ort.InferenceSession(str(onnx_baked), providers=["CPUExecutionProvider"])
    # 97x131 is not a multiple of the output stride: it goes in as it is.
    for h, w in [(97, 131), (64, 80)]:
        image = _image(h, w, seed=3)
        nhwc = image.permute(1, 2, 0).numpy()[None]  # (1, H, W, 3) uint8, as PIL/numpy give
        labels = sess.run(None, {"image": nhwc})[0]
        assert labels.shape == (1, h, w) and labels.dtype == np.uint8
        # what `deeplab predict` gives, in fp32 as the exported graph runs
        ref = predict_labels(model, image)
        assert (labels == ref.numpy()).mean() > 0.999
        assert len(np.unique(labels)) > 1
    meta = read_metadata(onnx_baked)
    assert meta["input"] == {"name": "image", "dtype": "uint8", "layout": "NHWC", "range": [0, 255]}


@pytest.mark.filterwarnings("ignore:.*torch.jit")
def test_torchscript_reload_at_another_size(run_dir, model, tmp_path):
    out = tmp_path / "model.pt"
    result = export(run_dir, out, fmt="torchscript", preprocessing=True)
    assert result.parity.passed, result.parity.summary()
    loaded = torch.jit.load(str(out))
    image = _image(75, 101, seed=5)
    x = image.permute(1, 2, 0)[None].contiguous()
    with torch.no_grad():
        got = loaded(x)
        ref = DeployModel(model, True, False, 3)(x)
    assert got.shape == (1, 3, 75, 101)
    assert (got - ref).abs().max() < 1e-4
    assert read_metadata(out)["classes"] == CLASSES
    mask = Segmenter.from_checkpoint(out, device="cpu").predict(image)
    assert (mask == predict_labels(model, image)[0].numpy()).mean() > 0.999


def test_safetensors_round_trip_rebuilds_the_model(run_dir, model, tmp_path, monkeypatch):
    out = tmp_path / "model.safetensors"
    result = export(run_dir, out)
    assert result.parity.passed and result.sidecar == tmp_path / "model.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar["classes"] == CLASSES and sidecar["ignore_index"] == 255
    assert sidecar["mean"] == pytest.approx(model.mean.flatten().tolist())
    assert sidecar["config"]["model"]["num_classes"] == 3

    def no_unpickling(*args, **kwargs):
        raise AssertionError("loading a safetensors export unpickled something")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    rebuilt, cfg, meta = load_safetensors(out)
    assert meta == sidecar and cfg.model.num_classes == 3
    ref_state, new_state = model.state_dict(), rebuilt.state_dict()
    assert ref_state.keys() == new_state.keys()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)
    x = _image(64, 80)[None].float() / 255
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    image = _image(64, 80, seed=2)
    seg = Segmenter.from_checkpoint(out, device="cpu", runtime="torch", amp="off")
    ref = predict_labels(prepare_model(model, torch.device("cpu")), image)[0].numpy()
    assert np.array_equal(seg.predict(image), ref)  # Segmenter prepares the model the same way
    monkeypatch.undo()

    # The sidecar is what loading reads: an edit shows, and without it loading refuses.
    sidecar["classes"][1]["name"] = "kitten"
    (tmp_path / "model.json").write_text(json.dumps(sidecar))
    assert Segmenter.from_checkpoint(out, device="cpu").class_names[1] == "kitten"
    (tmp_path / "model.json").unlink()
    with pytest.raises(ExportError, match="model.json not found"):
        load_safetensors(out)


def test_cli_export_prints_parity_and_json(run_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    args = ["export", "--checkpoint", str(run_dir), "--output", str(out), "--format", "onnx",
            "--opset", "17"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "parity ok" in text and "max |logit diff|" in text and out.is_file()
    st = tmp_path / "m.safetensors"
    assert main(["export", "--checkpoint", str(run_dir), "--output", str(st), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "safetensors" and result["path"] == str(st)
    assert result["sidecar"] == str(tmp_path / "m.json")
    assert result["parity"]["passed"] and result["parity"]["max_abs_diff"] < 1e-3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["m.json", "m.onnx", "m.safetensors"]  # no temps


def test_cli_export_checks_parity_on_dataset_images(run_dir, tmp_path, capsys):
    from segment_deeplab.data.synthetic import generate

    spec = generate(tmp_path / "data", num=4, size=(72, 88), num_classes=3)
    out = tmp_path / "m.pt"
    argv = ["export", "--checkpoint", str(run_dir), "--output", str(out), "--data", str(spec)]
    assert main(argv + ["--with-argmax"]) == 0
    text = capsys.readouterr().out
    assert "parity ok" in text and "72x88" in text and "images" in text


@pytest.mark.parametrize(
    ("fault", "name"), [("noise", "m.onnx"), ("crash", "m.onnx"), ("noise", "m.safetensors")]
)
def test_cli_export_fails_when_the_export_disagrees(
    run_dir, tmp_path, monkeypatch, capsys, fault, name
):
    real = export_mod.load_runner

    def broken(fmt, path, module, sidecar=None):
        run = real(fmt, path, module, sidecar)

        def runner(x):
            if fault == "crash":  # e.g. a graph that only runs at its traced size
                raise RuntimeError("Reshape: bad input shape")
            y = run(x)
            return y + 0.5 * torch.randn(y.shape)

        return runner

    monkeypatch.setattr(export_mod, "load_runner", broken)
    out = tmp_path / name
    # Opset 17 (the TorchScript-based exporter) only to be quick: the check is the same.
    opset = ["--opset", "17"] if name.endswith(".onnx") else []
    assert main(["export", "--checkpoint", str(run_dir), "--output", str(out), *opset]) == 1
    err = capsys.readouterr().err
    if fault == "crash":
        assert "parity check failed" in err and "Reshape: bad input shape" in err
    else:
        assert "parity FAILED" in err and "does not match PyTorch" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_export_errors_are_clear(run_dir, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert main(["export", "--checkpoint", str(run_dir), "--output", out, "--format", "onxx"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'onnx'" in err and "onnx, openvino, torchscript, safetensors" in err
    missing = tmp_path / "nope.pt"
    assert main(["export", "--checkpoint", str(missing), "--output", out]) == 2
    assert str(missing) in capsys.readouterr().err
    st = str(tmp_path / "m.safetensors")
    assert main(["export", "--checkpoint", str(run_dir), "--output", st, "--with-argmax"]) == 2
    assert "weights only" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run_dir), "--output", out, "--opset", "5"]) == 2
    assert "use 11..23" in capsys.readouterr().err


def test_segmenter_predicts_like_the_checkpoint_model(run_dir, model, tmp_path):
    image = _image(90, 120, seed=2)
    path = tmp_path / "photo.png"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    ref = predict_labels(prepare_model(model, torch.device("cpu")), image)[0].numpy()

    # fp32, as the reference: the engine is the fastest that agrees with PyTorch here
    # (`infer.runtimes`). The defaults' bf16 on AMX CPUs is checked below.
    seg = Segmenter.from_checkpoint(run_dir, device="cpu", amp="off")
    assert [c.name for c in seg.classes] == ["background", "cat", "dog"]
    mask = seg.predict(path)
    assert mask.dtype == np.uint8 and mask.shape == (90, 120)
    assert (mask == ref).mean() >= 0.999 and len(np.unique(mask)) > 1
    # The same image as a path string, PIL image, array and tensor: the same array.
    for same in (str(path), Image.open(path), image.permute(1, 2, 0).numpy(), image):
        assert np.array_equal(seg.predict(same), mask)
    probs = seg.predict_probs(path)
    assert probs.shape == (3, 90, 120) and np.allclose(probs.sum(0), 1, atol=1e-5)
    assert seg.colorize(mask).mode == "P"
    assert seg.overlay(path, mask).mode == "RGB"
    with pytest.raises(ValueError, match="uint8"):
        seg.predict(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        seg.predict(tmp_path / "nope.png")


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_segmenter_defaults_follow_the_cpu(run_dir, model, amp, monkeypatch):
    """`amp=auto` is bf16 on AMX CPUs, fp32 elsewhere; bf16 runs in PyTorch (the other
    engines are fp32) and gives the fp32 class map but at near-ties."""
    from segment_deeplab import device

    monkeypatch.setattr(device, "has_amx", lambda: amp == "bf16")
    image = _image(90, 120, seed=3)
    ref = predict_labels(prepare_model(model, torch.device("cpu")), image)[0].numpy()
    seg = Segmenter.from_checkpoint(run_dir, device="cpu", runtime="torch")
    assert seg.dtype == (torch.bfloat16 if amp == "bf16" else None)
    got = seg.predict(image)
    assert (got == ref).mean() >= (0.99 if amp == "bf16" else 1.0)
    if amp == "bf16":  # the default engine there is PyTorch, which autocasts
        default = Segmenter.from_checkpoint(run_dir, device="cpu")
        assert np.array_equal(default.predict(image), got) and default.runtime == "torch"


def test_predict_batch_groups_sizes_and_matches_predict(run_dir, tmp_path):
    # fp32: a batch and a single image round alike only where no autocast intervenes.
    seg = Segmenter.from_checkpoint(run_dir, device="cpu", runtime="torch", amp="off")
    sizes = [(64, 80), (45, 71), (64, 80), (64, 80), (45, 71)]
    images = [_image(h, w, seed=i).permute(1, 2, 0).numpy() for i, (h, w) in enumerate(sizes)]
    Image.fromarray(images[2]).save(tmp_path / "two.png")
    mixed = [images[0], images[1], tmp_path / "two.png", Image.fromarray(images[3]), images[4]]
    batches: list[int] = []
    hook = seg.model.register_forward_hook(lambda m, args, out: batches.append(len(args[0])))
    masks = seg.predict_batch(mixed, batch_size=8)
    hook.remove()
    assert sorted(batches) == [2, 3]  # one forward pass per size
    assert [m.shape for m in masks] == sizes
    # A batch of three and a batch of one round differently in float arithmetic: the
    # maps agree everywhere but where the top two classes are within that rounding.
    for got, image in zip(masks, images, strict=True):
        single = seg.predict(image)
        top2 = np.sort(np.asarray(seg.predict_probs([image])[0]), axis=0)[-2:]
        tie = top2[1] - top2[0] < 1e-4
        assert np.array_equal(got[~tie], single[~tie]) and tie.mean() < 1e-3
    again = seg.predict(mixed)
    assert sum(int((a != b).sum()) for a, b in zip(again, masks, strict=True)) == 0
    probs = seg.predict_probs(mixed[:2])
    assert [p.shape for p in probs] == [(3, 64, 80), (3, 45, 71)]


def test_segmenter_from_onnx(onnx_raw, onnx_baked, model, run_dir, tmp_path):
    image = _image(97, 131, seed=3)
    ref = predict_labels(model, image)[0].numpy()  # exported graphs run fp32
    for path in (onnx_raw, onnx_baked):
        seg = Segmenter.from_onnx(path, device="cpu")
        assert seg.class_names == ["background", "cat", "dog"]
        assert (seg.predict(image) == ref).mean() > 0.999 and len(np.unique(ref)) > 1
        masks = seg.predict_batch([image, _image(64, 80)])
        assert np.array_equal(masks[0], seg.predict(image)) and masks[1].shape == (64, 80)
    with pytest.raises(ExportError, match="not an ONNX file"):
        Segmenter.from_onnx(run_dir / "best.pt")


def test_cli_predict_runs_exports_like_segmenter(onnx_baked, tmp_path, capsys):
    image = _image(90, 120, seed=5)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "photo.png")
    argv = ["predict", str(tmp_path / "photo.png"), "--checkpoint", str(onnx_baked)]
    assert main([*argv, "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    seg = Segmenter.from_onnx(onnx_baked, device="cpu")
    assert np.array_equal(written, seg.predict(tmp_path / "photo.png"))
    assert len(np.unique(written)) > 1


def test_load_any_opens_every_format_to_the_same_predictions(
    run_dir, model, onnx_raw, onnx_baked, tmp_path
) -> None:
    """A run folder, its checkpoint, and each export (ONNX raw and baked, TorchScript,
    safetensors), opened by the one loader, predict the classes PyTorch predicts."""
    from segment_deeplab.checkpoint import load_any

    ts, st = tmp_path / "m.pt", tmp_path / "m.safetensors"
    assert export(run_dir, ts, fmt="torchscript", preprocessing=True).path == ts
    assert export(run_dir, st).path == st
    image = _image(61, 83, seed=5)
    ref = predict_labels(model, image)
    files = {
        run_dir: "checkpoint",
        run_dir / "best.pt": "checkpoint",
        st: "safetensors",
        onnx_raw: "onnx",
        onnx_baked: "onnx",
        ts: "torchscript",
    }
    for path, fmt in files.items():
        loaded = load_any(path, "cpu")
        assert loaded.format == fmt and loaded.path.is_file(), path
        assert [c.name for c in loaded.classes] == ["background", "cat", "dog"]
        assert loaded.ignore_index == 255
        got = predict_labels(prepare_model(loaded.model, torch.device("cpu")), image)
        assert got.shape == ref.shape and (got == ref).float().mean() >= 0.999, path
