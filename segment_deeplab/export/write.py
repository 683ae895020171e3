"""Export a checkpoint to ONNX, OpenVINO IR, TorchScript or safetensors, then check it
against PyTorch.

What TF DeepLab's `export_model.py` gave, and more: the exported file carries the class
names, colours, normalisation and ignore index, and can take a raw uint8 image and
return class ids (`preprocessing`, `argmax`), so a deployed model needs no extra code.

    raw:            image float32 (B, 3, H, W) RGB in [0, 1] -> logits float32 (B, C, H, W)
    preprocessing:  image uint8 (B, H, W, 3) RGB (numpy/PIL layout), any H and W
    argmax:         -> labels (B, H, W), uint8 (int64 past 256 classes)

A safetensors export is weights only; its config, classes and normalisation go to a
JSON file beside it (model.safetensors -> model.json), so loading it never runs code.
An OpenVINO IR is two files, model.xml (graph and metadata) and model.bin (weights).

Every export is written to a temporary file, run against the PyTorch model on real or
synthetic images at sizes other than the traced one, and renamed into place only if
it agrees.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import io
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from segment_deeplab import __version__
from segment_deeplab.atomic import OutputError, check_writable_file, refuse_inputs, staged
from segment_deeplab.checkpoint import (
    FORMAT,
    RUN_FILES,
    CheckpointError,
    load_model,
    load_safetensors,
    sniff_format,
)
from segment_deeplab.config import Config
from segment_deeplab.export import tensorrt as trt_export
from segment_deeplab.export.parity import (
    FP16_LOGIT_RTOL,
    LOGIT_RTOL,
    Parity,
    as_input,
    check_parity,
    parity_images,
    synthetic_images,
)
from segment_deeplab.export.runtime import (
    METADATA_FILE,
    OPENVINO_KEY,
    ExportError,
    onnx_runner,
    openvino,
    openvino_runner,
    quiet,
    sidecar_path,
    torchscript_module,
)
from segment_deeplab.infer.tta import input_multiple
from segment_deeplab.models.inputs import pad_color, to_input

FORMATS = ("onnx", "openvino", "torchscript", "safetensors", "tensorrt")
# A second file beside the output (`sidecar_path`).
TWO_FILES = ("safetensors", "openvino", "tensorrt")
SUFFIXES = {
    ".engine": "tensorrt",
    ".plan": "tensorrt",
    ".xml": "openvino",
    ".onnx": "onnx",
    ".pt": "torchscript",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
    ".safetensors": "safetensors",
}
# Read by onnxruntime >= 1.14, OpenVINO, TensorRT >= 8.6; written by torch's supported
# (torch.export-based) exporter, which starts at 18.
DEFAULT_OPSET = 18
MIN_DYNAMO_OPSET = 18
# Resize with input-dependent sizes needs 11; below 18 the TorchScript-based exporter.
OPSETS = range(11, 24)
TRACE_SIZE = (128, 160)  # example input; the parity sizes differ, to prove dynamic shapes


def trace_size(model: nn.Module) -> tuple[int, int]:
    """TRACE_SIZE, or larger where the model's image-pooling windows need it: traced
    where they give a single pooled row or column, torch.export keeps that one for
    every input size. Two windows per axis, at the output stride."""
    from segment_deeplab.models.aspp import pooling_window

    cfg = model.cfg
    window = pooling_window(cfg.image_pooling_crop_size, cfg.output_stride)
    if window is None:
        return TRACE_SIZE
    need = [
        (k + s) * cfg.output_stride for k, s in zip(window, cfg.image_pooling_stride, strict=True)
    ]
    return max(TRACE_SIZE[0], need[0]), max(TRACE_SIZE[1], need[1])


class DeployModel(nn.Module):
    """A segmentation model with optional baked pre-processing and argmax.

    With `preprocessing` it takes uint8 (B, H, W, 3) RGB, scales it to [0, 1] and, for a
    model that needs it (`input_multiple`), pads it to the output stride with the mean
    colour, as `deeplab predict` does, so both give the same class map.
    """

    def __init__(self, model: nn.Module, preprocessing: bool, argmax: bool, num_classes: int):
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.argmax = argmax
        self.stride = input_multiple(model)
        self.labels_dtype = torch.uint8 if num_classes <= 256 else torch.int64
        self.register_buffer("pad_color", pad_color(model).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preprocessing:
            x = to_input(x.permute(0, 3, 1, 2))  # (B, 3, H, W) in [0, 1]
        if self.preprocessing and self.stride > 1:  # decided per model, not per input
            h, w = x.shape[-2], x.shape[-1]
            s = self.stride
            # Pad always, by a traced amount (0 when aligned): a Python `if` would freeze
            # the branch taken at the example size into the exported graph. Padding a
            # 0/1 frame and adding the colour keeps the image pixels bit-exact.
            pad = [0, (s - w % s) % s, 0, (s - h % s) % s]
            frame = F.pad(torch.zeros_like(x[:, :1]), pad, value=1.0)  # (B, 1, H', W')
            y = self.model(F.pad(x, pad) + frame * self.pad_color)[..., :h, :w]
        else:
            y = self.model(x)
        return y.argmax(1).to(self.labels_dtype) if self.argmax else y


@dataclass
class ExportResult:
    """What was written, and how closely it matches PyTorch."""

    path: Path | None  # None when the parity check failed: nothing was written
    sidecar: Path | None  # the JSON beside a safetensors export
    format: str
    preprocessing: bool
    argmax: bool
    opset: int | None
    parity: Parity
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path) if self.path else None
        d["sidecar"] = str(self.sidecar) if self.sidecar else None
        d["parity"]["passed"] = self.parity.passed
        return d


def resolve_format(fmt: str | None, output: str | Path) -> str:
    """The format asked for, or the one the output suffix names."""
    if fmt is None:
        fmt = SUFFIXES.get(Path(output).suffix.lower())
        if fmt is None:
            raise ExportError(
                f"cannot tell the format from '{output}'; give --format ({', '.join(FORMATS)})"
            )
    if fmt not in FORMATS:
        hit = difflib.get_close_matches(fmt, FORMATS, n=1)
        hint = f" Did you mean '{hit[0]}'?" if hit else ""
        raise ExportError(f"unknown format '{fmt}'.{hint} Valid formats: {', '.join(FORMATS)}")
    return fmt


def build_metadata(
    model: nn.Module, cfg: Config, ckpt: dict[str, Any], preprocessing: bool, argmax: bool
) -> dict[str, Any]:
    """Everything a deployment needs besides the weights, as JSON-able values."""
    if preprocessing:
        inp = {"name": "image", "dtype": "uint8", "layout": "NHWC", "range": [0, 255]}
    else:
        inp = {"name": "image", "dtype": "float32", "layout": "NCHW", "range": [0, 1]}
    labels = "uint8" if len(ckpt["classes"]) <= 256 else "int64"
    if argmax:
        out = {"name": "labels", "dtype": labels, "layout": "NHW"}
    else:
        out = {"name": "logits", "dtype": "float32", "layout": "NCHW"}
    return {
        "format": FORMAT,
        "version": __version__,
        "classes": ckpt["classes"],
        "ignore_index": int(ckpt.get("ignore_index", 255)),
        # Applied inside the model: callers only scale to [0, 1] (or pass uint8).
        "mean": getattr(model, "mean", torch.zeros(3)).flatten().tolist(),
        "std": getattr(model, "std", torch.ones(3)).flatten().tolist(),
        "output_stride": int(getattr(model, "output_stride", 1) or 1),
        # Pad height and width to a multiple of this before running a plain export.
        "input_multiple": input_multiple(model),
        "input": inp,
        "output": out,
        "config": cfg.to_dict(),
    }


def write_onnx(module: DeployModel, example: torch.Tensor, path: Path, opset: int, meta: dict):
    """torch.onnx.export with dynamic batch, height and width, plus metadata_props.

    Opset 18 and up (the default) goes through torch's supported exporter, built on
    torch.export (`dynamo=True`, with onnxscript); opsets 11-17, which that exporter does
    not write, through the TorchScript-based one torch still ships for them.
    """
    names = ("batch", "height", "width")
    axes_in = (0, 1, 2) if module.preprocessing else (0, 2, 3)
    axes_out = (0, 1, 2) if module.argmax else (0, 2, 3)
    out = meta["output"]["name"]
    if opset >= MIN_DYNAMO_OPSET:
        # Dim.DYNAMIC lets torch.export work out how the sizes relate (the padding to
        # the stride makes them non-trivial); the parity check proves the result.
        dynamic = torch.export.Dim.DYNAMIC
        kwargs = {"dynamo": True, "dynamic_shapes": ({a: dynamic for a in axes_in},)}
        kwargs.update(verbose=False, optimize=True, external_data=False)
    else:
        dynamic_axes = {
            "image": dict(zip(axes_in, names, strict=True)),
            out: dict(zip(axes_out, names, strict=True)),
        }
        kwargs = {"dynamo": False, "dynamic_axes": dynamic_axes}
    try:
        with quiet(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's step log
            torch.onnx.export(
                module,
                (example,),
                str(path),
                opset_version=opset,
                input_names=["image"],
                output_names=[out],
                **kwargs,
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"ONNX export at opset {opset} failed: {first}") from e
    proto = onnx.load(str(path))
    _name_dims(proto, dict(zip(axes_in, names, strict=True)))
    proto.doc_string = "segment-deeplab model; metadata_props 'input' and 'output' describe it"
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _name_dims(proto: onnx.ModelProto, names: dict[int, str]) -> None:
    """Call the input's dynamic dimensions batch, height and width everywhere in the
    graph (torch.export names them s0, s1, ...), as the metadata and users expect."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    rename = {dims[a].dim_param: n for a, n in names.items() if dims[a].dim_param}
    if not rename:
        return
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def write_openvino(module: DeployModel, example: torch.Tensor, path: Path, weights: Path, meta):
    """OpenVINO IR (the graph at `path`, fp32 weights at `weights`) converted straight
    from PyTorch with dynamic batch, height and width; the metadata in its rt_info."""
    ov = openvino()
    try:
        with quiet(), torch.inference_mode():
            model = ov.convert_model(module, example_input=example)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"OpenVINO conversion failed: {first}") from e
    model.set_rt_info(json.dumps(meta), [OPENVINO_KEY, "metadata"])
    # save_model wants a .xml name and puts NAME.bin beside it: a scratch folder beside
    # `path` (same file system), whose two files then replace the staged ones.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as scratch:
        xml = Path(scratch) / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        xml.replace(path)
        xml.with_suffix(".bin").replace(weights)


def write_torchscript(module: DeployModel, example: torch.Tensor, path: Path, meta: dict) -> None:
    """torch.jit.trace (timm backbones are not all scriptable) plus the metadata file."""
    with quiet():
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(meta)})


def write_safetensors(model: nn.Module, path: Path, meta: dict, sidecar: Path) -> None:
    """The state dict at `path`, the metadata as JSON at `sidecar`.

    The header keeps a copy of the metadata (each key a JSON string), so the weights
    file alone still says what it is.
    """
    # clone(): safetensors refuses tensors that share storage.
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")


def load_runner(
    fmt: str, path: Path, module: DeployModel, sidecar: Path | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reload an exported file as a function of the inputs that `module` takes."""
    if fmt == "onnx":
        return onnx_runner(path, torch.device("cpu"))
    if fmt == "openvino":
        return openvino_runner(path, torch.device("cpu"), weights=sidecar)
    if fmt == "torchscript":
        return torchscript_module(path, torch.device("cpu"))
    if fmt == "tensorrt":
        meta = json.loads(Path(sidecar).read_text())
        return trt_export.tensorrt_runner(path, torch.device("cuda"), meta)
    model, _, meta = load_safetensors(path, sidecar)
    return DeployModel(model, module.preprocessing, module.argmax, len(meta["classes"])).eval()


class _Rejected(Exception):
    """The written file failed its parity check: nothing is renamed into place."""


def _check_request(fmt: str, output: Path, baked: bool, opset: int) -> str:
    """Refuse what cannot be exported as asked, before any work; returns `fmt`.

    (That the output is not written over the checkpoint or an earlier export is
    `_check_not_taken`'s part.)"""
    if fmt == "safetensors" and baked:
        raise ExportError(
            "safetensors holds weights only; --with-preprocessing and --with-argmax apply "
            "to onnx, openvino and torchscript"
        )
    if fmt == "tensorrt" and baked:
        raise ExportError(
            "a TensorRT engine takes float (B, 3, H, W) in [0, 1] and returns logits; "
            "--with-preprocessing and --with-argmax apply to onnx, openvino and torchscript"
        )
    if fmt == "tensorrt":
        trt_export.require_gpu()
        trt_export.tensorrt()
    if fmt in ("onnx", "tensorrt") and opset not in OPSETS:
        span = f"{OPSETS[0]}..{OPSETS[-1]}"
        raise ExportError(f"--opset {opset} is not supported; use {span} (default {DEFAULT_OPSET})")
    if output.is_dir():
        raise ExportError(f"--output {output} is a folder; give a file name, e.g. model.{fmt}")
    check_writable_file(output)
    if fmt in ("safetensors", "tensorrt") and sidecar_path(output) == output:
        suffix = "safetensors" if fmt == "safetensors" else "engine"
        raise ExportError(f"--output {output}: the config goes to NAME.json; name it NAME.{suffix}")
    if fmt == "openvino" and sidecar_path(output, fmt) == output:
        raise ExportError(f"--output {output}: the weights go to NAME.bin; name it NAME.xml")
    return fmt


def _check_not_taken(output: Path, fmt: str, checkpoint: str | Path, overwrite: bool) -> None:
    """The checkpoint is never written over; an earlier export only with `overwrite`."""
    written = [output] + ([sidecar_path(output, fmt)] if fmt in TWO_FILES else [])
    source = Path(checkpoint)
    sources = [source / n for n in RUN_FILES] if source.is_dir() else [source]
    refuse_inputs(written, [p for p in sources if p.exists()])
    there = [p for p in written if p.exists()]
    if there and overwrite:
        try:
            known = sniff_format(output) in FORMATS
        except CheckpointError:
            known = False
        if not known:
            raise OutputError(
                f"{output} exists and is no export: --overwrite replaces exports only"
            )
    if there and not overwrite:
        raise OutputError(
            f"{there[0]} already exists: an earlier export is never replaced silently; "
            "give another --output, or --overwrite to replace it"
        )


def export(
    checkpoint: str | Path,
    output: str | Path,
    fmt: str | None = None,
    preprocessing: bool = False,
    argmax: bool = False,
    opset: int = DEFAULT_OPSET,
    data: str | Path | None = None,
    spec: str | Path | None = None,
    overwrite: bool = False,
    max_batch: int = trt_export.MAX_BATCH,
    max_side: int = trt_export.MAX_SIDE,
) -> ExportResult:
    """Export a checkpoint, check parity on the reloaded file, and write it atomically.

    Args:
        checkpoint: a segment-deeplab checkpoint or a run folder (best.pt, then last.pt).
        output: the file to write; safetensors also writes NAME.json beside it.
        fmt: onnx, openvino, torchscript or safetensors; None: from the output suffix.
        preprocessing: bake in the uint8 NHWC input handling (not safetensors).
        argmax: bake in the argmax: the output is class ids (not safetensors).
        opset: ONNX opset.
        data: a dataset or image folder whose images the parity check uses;
            None: synthetic images.
        spec: a dataset.yaml kept elsewhere, for `data`.
        overwrite: replace an earlier export at `output` (the checkpoint never).
        max_batch, max_side: the largest batch and height or width a TensorRT engine
            takes (it is built for that range).

    Returns:
        The result; its `path` is None, and nothing is written, when parity failed.
    """
    start = time.perf_counter()
    output = Path(output)
    fmt = _check_request(resolve_format(fmt, output), output, preprocessing or argmax, opset)
    if fmt == "tensorrt":
        trt_export.check_shapes(max_batch, max_side)
    _check_not_taken(output, fmt, checkpoint, overwrite)
    model, cfg, ckpt = load_model(checkpoint, map_location="cpu")
    module = DeployModel(model, preprocessing, argmax, len(ckpt["classes"])).eval()
    # A TensorRT engine is built and checked on the GPU, against the fp32 model there.
    device = torch.device("cuda") if fmt == "tensorrt" else None
    if device is not None:
        module = module.to(device)
    meta = build_metadata(model, cfg, ckpt, preprocessing, argmax)
    batches, source = parity_images(data, spec)
    g = torch.Generator().manual_seed(0)
    trace = trace_size(model)
    # Two images: with one, torch.export may take the batch for a constant 1 (its 0/1
    # specialisation) wherever an op broadcasts over it, and fix it so in the graph.
    example = as_input(synthetic_images(2, *trace, g), preprocessing)
    if trace != TRACE_SIZE:  # and a size with several pooling windows, odd, untraced
        batches.append(synthetic_images(1, trace[0] + 17, trace[1] + 33, g))

    parity: Parity | None = None
    side = sidecar_path(output, fmt) if fmt in TWO_FILES else None
    # Written beside the output and renamed over it only when parity passes; the second
    # file (safetensors' JSON, OpenVINO's weights) is renamed first, so once the output
    # appears, it is there.
    with contextlib.suppress(_Rejected), staged(output) as tmp, contextlib.ExitStack() as stack:
        tmp_side = stack.enter_context(staged(side)) if side is not None else None
        if fmt == "onnx":
            write_onnx(module, example, tmp, opset, meta)
        elif fmt == "openvino":
            write_openvino(module, example, tmp, tmp_side, meta)
        elif fmt == "torchscript":
            write_torchscript(module, example, tmp, meta)
        elif fmt == "tensorrt":
            half = trt_export.HalfPrecision(copy.deepcopy(module)).eval()
            graph = functools.partial(write_onnx, half, example.to(device), opset=opset, meta=meta)
            trt_export.write_tensorrt(graph, tmp, meta, tmp_side, max_batch, max_side)
        else:
            write_safetensors(model, tmp, meta, tmp_side)
        runner = load_runner(fmt, tmp, module, tmp_side)
        rtol = FP16_LOGIT_RTOL if fmt == "tensorrt" else LOGIT_RTOL
        parity = check_parity(module, runner, batches, source, device, rtol)
        if not parity.passed:
            raise _Rejected
    written = parity is not None and parity.passed
    return ExportResult(
        path=output if written else None,
        sidecar=side if written else None,
        format=fmt,
        preprocessing=preprocessing,
        argmax=argmax,
        opset=opset if fmt == "onnx" else None,
        parity=parity,
        seconds=round(time.perf_counter() - start, 2),
    )
