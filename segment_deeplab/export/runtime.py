"""Exported files run as models: onnxruntime sessions, OpenVINO compiled models and
TorchScript modules behind the PyTorch model's contract, so `predict_probs` (and its TTA)
runs them as it runs a checkpoint. `checkpoint.load_any` opens them."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from segment_deeplab.models.inputs import to_uint8

METADATA_FILE = "segment_deeplab.json"  # TorchScript extra file with the metadata


class ExportError(ValueError):
    """An export that cannot be made or read as asked; the message says how to fix it."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    # Tracer and deprecation chatter tells users nothing they can act on; the parity
    # check at other sizes is what shows whether the exported graph is right.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def sidecar_path(path: str | Path, fmt: str = "safetensors") -> Path:
    """The second file of a two-file export: the JSON beside a .safetensors file
    (model.safetensors -> model.json), the weights beside an OpenVINO IR (model.xml ->
    model.bin)."""
    return Path(path).with_suffix(".bin" if fmt == "openvino" else ".json")


class ExportedModel(nn.Module):
    """An ONNX or TorchScript export behind the PyTorch model's contract.

    Takes (B, 3, H, W) RGB in [0, 1] and returns (B, C, H, W) scores, whatever steps
    were baked into the export, so `predict_probs` can run it with TTA.
    """

    def __init__(self, run: Callable[[torch.Tensor], Any], meta: dict[str, Any]) -> None:
        super().__init__()
        self.run = run  # a TorchScript module registers as a submodule: device follows it
        self.uint8_input = meta["input"]["dtype"] == "uint8"
        self.labels_output = meta["output"]["name"] == "labels"
        self.num_classes = len(meta["classes"])
        self.output_stride = int(meta.get("output_stride", 1))
        # Exports of models that needed their input padded to the stride lack the key.
        self.input_multiple = int(meta.get("input_multiple", self.output_stride))
        self.register_buffer("mean", torch.tensor(meta["mean"]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uint8_input:  # x came from uint8 / 255: rounding restores it exactly
            x = to_uint8(x).permute(0, 2, 3, 1)
        y = torch.as_tensor(self.run(x.contiguous())).to(x.device)
        if self.labels_output:
            # Scores whose softmax is one-hot to float precision: TTA averaging becomes a vote.
            y = F.one_hot(y.long(), self.num_classes).permute(0, 3, 1, 2).float() * 50.0
        return y


def onnx_runner(
    model: str | Path | bytes, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """An onnxruntime session (of a file, or of ONNX bytes) as a function of tensors,
    on as many threads as torch uses; CUDA when asked and available."""
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    source = model if isinstance(model, bytes) else str(model)
    sess = ort.InferenceSession(source, options, providers=providers)
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.cpu().numpy()})[0])


OPENVINO_EXTRA = "pip install 'segment-deeplab[openvino]'"
OPENVINO_KEY = "segment_deeplab"  # rt_info section of an OpenVINO IR export


def openvino():
    """The openvino module, or an ExportError saying how to install it."""
    try:
        import openvino as ov
    except ImportError as e:
        raise ExportError(f"OpenVINO is not installed; {OPENVINO_EXTRA}") from e
    return ov


def openvino_runner(
    model, device: torch.device, weights: str | Path | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """An OpenVINO model (an IR .xml path, its .bin beside it or at `weights`, or an
    `ov.Model`) compiled for the CPU, as a function of tensors. fp32 inference, as the
    file was saved (OpenVINO would otherwise pick bf16 on AMX CPUs), on as many threads
    as torch uses."""
    if device.type != "cpu":
        raise ExportError(f"the OpenVINO runtime here runs on the CPU, not {device}")
    if isinstance(model, (str, Path)):
        stat = Path(model).stat()
        key: tuple = (str(model), str(weights), stat.st_mtime_ns, stat.st_size)
    else:
        key = ("model", id(model))
    key += (torch.get_num_threads(),)
    compiled = _COMPILED.get(key)
    if compiled is None:
        ov = openvino()
        core = ov.Core()
        if isinstance(model, (str, Path)):
            source = core.read_model(str(model), str(weights) if weights else None)
        else:
            source = model
        config = {
            "INFERENCE_NUM_THREADS": str(torch.get_num_threads()),
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        compiled = core.compile_model(source, "CPU", config)
        _COMPILED[key] = compiled
    return lambda x: torch.from_numpy(compiled(x.cpu().numpy())[0])


# OpenVINO's CPU plugin gives the thread that compiles a model an alternate signal stack
# and frees it with the compiled model, from whichever thread drops it last; the
# compiling thread keeps the freed stack, and the next signal a Python handler takes
# there (Ctrl-C, SIGTERM) kills the process with SIGSEGV. So each compiled model is kept
# for the life of the process, and opening the same file again reuses it.
_COMPILED: dict[tuple, Any] = {}


def openvino_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata an OpenVINO IR export keeps in its rt_info."""
    import json

    model = openvino().Core().read_model(str(path))
    if not model.has_rt_info([OPENVINO_KEY, "metadata"]):
        return {}
    return json.loads(model.get_rt_info([OPENVINO_KEY, "metadata"]).astype(str))


def torchscript_module(path: str | Path, device: torch.device) -> nn.Module:
    """A TorchScript export loaded onto `device` (torch.jit's notices kept quiet)."""
    with quiet():
        return torch.jit.load(str(path), map_location=device)
