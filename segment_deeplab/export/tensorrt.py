"""TensorRT engines: a checkpoint built into an fp16 engine for the GPU it runs on.

`deeplab export --format tensorrt --output model.engine` writes the engine and, beside
it, `model.json` with the metadata (classes, normalisation, the shapes it was built
for, the TensorRT version and the GPU). An engine runs only on the GPU model and the
TensorRT version that built it; elsewhere `tensorrt_runner` says to build it again.

The engine is built from an ONNX graph whose weights and arithmetic are fp16 and whose
input and output stay fp32: TensorRT 11 builds only strongly typed networks (no
precision flags), and TensorRT 10 is told to keep the graph's types too, so both
versions build the same engine. The final bilinear upsampling of the logits stays fp32,
as in PyTorch. Like every export, the engine is checked against the PyTorch model (on
the GPU) before it is renamed into place.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segment_deeplab.export.runtime import ExportError

TENSORRT_EXTRA = "pip install 'segment-deeplab[tensorrt]'"
SUFFIXES = (".engine", ".plan")
MIN_SIDE = 32  # the smallest height and width an engine takes
OPT_SIDE = 512  # the shape TensorRT tunes its kernels for: (1, 3, 512, 512)
MAX_BATCH = 4  # larger batches are run in chunks of this; more takes more GPU memory
MAX_SIDE = 2048


def tensorrt():
    """The tensorrt module, or an ExportError saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ExportError(f"TensorRT is not installed; {TENSORRT_EXTRA}") from e
    return trt


def require_gpu() -> None:
    """An ExportError unless a CUDA GPU is visible: engines are built on the GPU that
    will run them."""
    if not torch.cuda.is_available():
        raise ExportError(
            "a TensorRT engine is built on, and only runs on, an NVIDIA GPU, and this "
            "machine shows none (torch.cuda.is_available() is False); export --format onnx "
            "here and build the engine on the target GPU (deeplab export --format tensorrt "
            "there, or trtexec --onnx=model.onnx --saveEngine=model.engine)"
        )


class HalfPrecision(nn.Module):
    """`module` with fp16 weights and arithmetic behind an fp32 input and output."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()
        # What `write_onnx` reads off a DeployModel.
        self.preprocessing = getattr(module, "preprocessing", False)
        self.argmax = getattr(module, "argmax", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x.half())
        return y.float() if y.is_floating_point() else y


def check_shapes(max_batch: int, max_side: int) -> None:
    if max_batch < 1:
        raise ExportError(f"--max-batch {max_batch}: give 1 or more (default {MAX_BATCH})")
    if max_side < OPT_SIDE:
        raise ExportError(f"--max-side {max_side}: give {OPT_SIDE} or more (default {MAX_SIDE})")


def write_tensorrt(
    onnx_writer: Callable[[Path], None],
    path: Path,
    meta: dict[str, Any],
    sidecar: Path,
    max_batch: int = MAX_BATCH,
    max_side: int = MAX_SIDE,
) -> None:
    """Build the engine of the ONNX graph `onnx_writer(file)` writes; serialise it to
    `path` and the metadata (with the engine's shapes and where it was built) to
    `sidecar`."""
    trt = tensorrt()
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as scratch:
        graph = Path(scratch) / "model.onnx"
        onnx_writer(graph)
        data = graph.read_bytes()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 10; 11 types every network strongly
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not read the ONNX graph: {errors or 'no reason given'}")
    name = network.get_input(0).name
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    lo, opt = (1, 3, MIN_SIDE, MIN_SIDE), (1, 3, OPT_SIDE, OPT_SIDE)
    hi = (max_batch, 3, max_side, max_side)
    profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(
            f"TensorRT could not build the engine (shapes up to {max_batch}x3x{max_side}x"
            f"{max_side}); its log above says why; a smaller --max-side or --max-batch "
            "needs less GPU memory"
        )
    path.write_bytes(bytes(engine))
    meta = dict(meta)
    meta["tensorrt"] = {
        "version": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "precision": "fp16",
        "min_shape": list(lo),
        "opt_shape": list(opt),
        "max_shape": list(hi),
    }
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")


def is_engine(path: Path) -> bool:
    """An engine `write_tensorrt` wrote: the suffix, and its JSON saying so beside it."""
    side = path.with_suffix(".json")
    if path.suffix not in SUFFIXES or not side.is_file():
        return False
    try:
        return "tensorrt" in json.loads(side.read_text())
    except (OSError, ValueError):
        return False


def tensorrt_runner(
    path: str | Path, device: torch.device, meta: dict[str, Any] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A serialised engine as a function of CUDA tensors (fp32 (B, 3, H, W) in, fp32
    out), run on torch's current stream."""
    path = Path(path)
    require_gpu()
    if device.type != "cuda":
        raise ExportError(
            f"a TensorRT engine runs on a CUDA GPU, not on {device}; use --device cuda"
        )
    trt = tensorrt()
    built = (meta or {}).get("tensorrt", {})
    logger = trt.Logger(trt.Logger.WARNING)
    with torch.cuda.device(device):
        engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ExportError(
                f"{path} does not load here: an engine runs only with the TensorRT version "
                f"and on the GPU model that built it ({built.get('version', '?')} on "
                f"{built.get('gpu', '?')}; here {trt.__version__} on "
                f"{torch.cuda.get_device_name(device)}); build it again on this machine "
                "with deeplab export --format tensorrt"
            )
        context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(f"{path} has inputs {inputs} and outputs {outputs}; expected one of each")
    src, dst = inputs[0], outputs[0]
    hi = built.get("max_shape")
    limit = int(hi[0]) if hi else None

    def run(x: torch.Tensor) -> torch.Tensor:
        if limit is not None and len(x) > limit:  # the engine's batch range is a memory bound
            return torch.cat([run(part) for part in x.split(limit)])
        x = x.to(device, torch.float32).contiguous()
        if not context.set_input_shape(src, tuple(x.shape)):
            raise ExportError(
                f"{path} takes sides of {MIN_SIDE} to {hi[-1] if hi else '?'} pixels, not "
                f"{tuple(x.shape[-2:])} (H, W); predict with --window 1024, or build the "
                "engine again with a larger --max-side"
            )
        y = torch.empty(tuple(context.get_tensor_shape(dst)), device=device, dtype=torch.float32)
        context.set_tensor_address(src, x.data_ptr())
        context.set_tensor_address(dst, y.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {path} on a {tuple(x.shape)} input")
        return y

    return run
