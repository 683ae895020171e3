"""Which engine runs a checkpoint's forward pass on this machine: PyTorch, onnxruntime or
OpenVINO.

On a CPU in fp32 the same network runs at different speeds in different engines, and
which one wins depends on the CPU (AVX2 or AVX-512, core count) and on the model. So it
is measured, not guessed: `choose_runtime` converts the model (ONNX for onnxruntime, an
OpenVINO IR converted straight from PyTorch), checks each against the PyTorch model as
`deeplab export` does (>= 99.9% of pixels the same class, at two sizes), times each on a
probe image, and runs the fastest that agrees. The converted files and the choice are
cached per model and machine (`cache_dir()`), so the work happens once; a later run
loads the winner directly.

Where autocast runs the PyTorch model in bf16 (AMX CPUs, GPUs) PyTorch is used: the
other engines here run fp32 and are the slower choice there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from segment_deeplab import __version__
from segment_deeplab.data.decode import image_size
from segment_deeplab.export.parity import check_parity, synthetic_images
from segment_deeplab.export.runtime import ExportedModel, ExportError, onnx_runner, openvino_runner
from segment_deeplab.models.deeplab import DeepLabV3

RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
PROBE_SIZE = (360, 480)  # (H, W) timed when the caller knows no better
# `deeplab predict` converts only for at least this many images (unless the choice is
# cached or a runtime is named): converting costs seconds that a few images never repay.
MIN_IMAGES = 16
CACHE_ENV = "SEGMENT_DEEPLAB_CACHE"


@dataclass
class Choice:
    """The model to predict with, and why it is that one."""

    model: nn.Module  # the PyTorch model, or an `ExportedModel` around the engine
    runtime: str  # torch, onnxruntime, openvino, or "as saved" for an export
    reason: str = ""  # one line for the user
    speeds: dict[str, float] = field(default_factory=dict)  # img/s on the probe
    rejected: dict[str, str] = field(default_factory=dict)  # runtime -> why not
    cached: bool = False

    @property
    def dtype_applies(self) -> bool:
        """Whether the forward pass's autocast dtype still applies (PyTorch only)."""
        return self.runtime == "torch"

    def describe(self) -> str:
        text = f"runtime: {self.runtime}"
        if self.speeds:
            rates = ", ".join(f"{k} {v:.1f}" for k, v in self.speeds.items())
            text += f" (img/s on a probe image: {rates})"
        if self.rejected:
            text += "; not used: " + "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        if self.cached:
            text += " [chosen earlier on this machine]"
        if self.reason:
            text += f"; {self.reason}"
        return text


def cache_dir() -> Path:
    """Where converted models and choices are kept: $SEGMENT_DEEPLAB_CACHE, else
    $XDG_CACHE_HOME/segment-deeplab, else ~/.cache/segment-deeplab."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "segment-deeplab"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    out = {"segment_deeplab": __version__, "torch": torch.__version__}
    for name in ("onnxruntime", "openvino"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    return out


def model_key(model: nn.Module) -> str:
    """A content hash of the model (weights and config), the machine and the engines."""
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    h.update(json.dumps(getattr(cfg, "__dict__", {}), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    machine = {"cpu": _cpu_name(), "threads": torch.get_num_threads(), **_versions()}
    h.update(json.dumps(machine, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _engine_meta(model: nn.Module) -> dict:
    """What `ExportedModel` needs to know of a converted model (raw float in/logits out)."""
    return {
        "input": {"name": "image", "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "dtype": "float32", "layout": "NCHW"},
        "classes": [None] * int(model.cfg.num_classes),
        "mean": model.mean.flatten().tolist(),
        "output_stride": int(model.output_stride),
        "input_multiple": 1,  # stride-aligned upsampling: any size goes in as it is
    }


def _convert(model: nn.Module, runtime: str, folder: Path) -> None:
    """Write `runtime`'s file for `model` into `folder` (raw float input, logits out)."""
    from segment_deeplab.export.write import (
        TRACE_SIZE,
        DeployModel,
        write_onnx,
        write_openvino,
    )

    module = DeployModel(model, False, False, int(model.cfg.num_classes)).eval()
    example = synthetic_images(1, *TRACE_SIZE, torch.Generator().manual_seed(0)).float() / 255
    meta = {**_engine_meta(model), "source": "segment-deeplab runtime cache"}
    if runtime == "onnxruntime":
        # Opset 17: the TorchScript-based exporter converts in seconds where the
        # torch.export-based one takes half a minute; the file stays in the cache.
        write_onnx(module, example, folder / "model.onnx", 17, meta)
    else:
        write_openvino(module, example, folder / "model.xml", folder / "model.bin", meta)


def _open(model: nn.Module, runtime: str, folder: Path) -> nn.Module:
    if runtime == "onnxruntime":
        run = onnx_runner(folder / "model.onnx", torch.device("cpu"))
    else:
        run = openvino_runner(folder / "model.xml", torch.device("cpu"))
    return ExportedModel(run, _engine_meta(model)).eval()


def _rate(model: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Images/s of `model(x)`: median of `repeats` timed calls after one warm-up."""
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return x.shape[0] / statistics.median(times)


def probe_size(source: torch.Tensor | Path) -> tuple[int, int] | None:
    """(H, W) of an image tensor or file to time the engines at; None when the file's
    header cannot be read (that image then fails on its own when it is decoded)."""
    if torch.is_tensor(source):
        return tuple(source.shape[-2:])
    try:
        return image_size(source)
    except Exception:
        return None


def _available(runtime: str) -> str | None:
    """None when the engine (a module of the same name) can be imported, else why not."""
    try:
        __import__(runtime)
    except ImportError:
        extra = "segment-deeplab[openvino]" if runtime == "openvino" else runtime
        return f"not installed (pip install '{extra}')"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def choose_runtime(
    model: nn.Module,
    device: torch.device,
    dtype: torch.dtype | None,
    runtime: str = "auto",
    probe_size: tuple[int, int] | None = None,
    images: int | None = None,
    progress: bool = False,
) -> Choice:
    """The engine to run `model` (prepared by `fold.for_inference`) with; see the module.

    Args:
        model: the PyTorch model; an export (`ExportedModel`) runs as saved.
        device, dtype: where and in which autocast dtype PyTorch would run it.
        runtime: auto, torch, onnxruntime or openvino. A named engine is converted and
            parity-checked too, and refused (ExportError) when it disagrees.
        probe_size: (H, W) to time at, e.g. the first image's size.
        images: how many images follow; with fewer than MIN_IMAGES, `auto` converts
            nothing that is not cached already.
        progress: say on stderr that the (one-off) choice is being made.
    """
    if runtime not in RUNTIMES:
        raise ExportError(f"unknown runtime '{runtime}'; use one of {', '.join(RUNTIMES)}")
    if not isinstance(model, DeepLabV3):
        if runtime not in ("auto", "torch"):
            raise ExportError(
                f"--runtime {runtime} converts checkpoints; this model is an export, which "
                "runs in the engine it was saved for"
            )
        return Choice(model, "as saved" if isinstance(model, ExportedModel) else "torch")
    if runtime == "torch":
        return Choice(model, "torch", "as asked")
    if device.type != "cpu":
        if runtime != "auto":
            raise ExportError(f"--runtime {runtime} runs on the CPU here; use --device cpu")
        return Choice(model, "torch", f"on {device.type}")
    if runtime == "auto" and dtype is not None:
        name = str(dtype).removeprefix("torch.")
        return Choice(model, "torch", f"{name} autocast on this CPU is faster than fp32 engines")

    key = model_key(model)
    folder = cache_dir() / "runtimes" / key
    record = folder / "choice.json"
    if runtime == "auto" and record.is_file():
        with contextlib.suppress(Exception):  # a damaged cache entry is chosen again
            saved = json.loads(record.read_text())
            winner = saved["runtime"]
            chosen = model if winner == "torch" else _open(model, winner, folder)
            return Choice(chosen, winner, "", saved["speeds"], saved["rejected"], cached=True)
    if runtime == "auto" and images is not None and images < MIN_IMAGES:
        return Choice(
            model, "torch", f"{images} image(s): converting to other engines does not pay off "
            f"under {MIN_IMAGES} (--runtime openvino or onnxruntime to use one anyway)",
        )  # fmt: skip

    if progress:
        print("choosing the fastest runtime for this model on this CPU (once)...", file=sys.stderr)
    candidates = ["onnxruntime", "openvino"] if runtime == "auto" else [runtime]
    h, w = probe_size or PROBE_SIZE
    g = torch.Generator().manual_seed(0)
    probe = synthetic_images(1, h, w, g).float() / 255
    parity_batches = [synthetic_images(1, h, w, g), synthetic_images(1, 97, 131, g)]
    speeds: dict[str, float] = {}
    rejected: dict[str, str] = {}
    engines: dict[str, nn.Module] = {"torch": model}
    writable = _prepare(folder)
    scratch = None if writable else tempfile.TemporaryDirectory(prefix="segment-deeplab-")
    where = folder if writable else Path(scratch.name)
    reference = _Raw(model)
    for name in candidates:
        why = _available(name)
        if why is None:
            try:
                _convert(model, name, where)
                engine = _open(model, name, where)
                parity = check_parity(reference, engine, parity_batches, "synthetic")
                if parity.passed:
                    engines[name] = engine
                else:
                    why = f"disagrees with PyTorch ({parity.agreement:.3%} of pixels)"
            except Exception as e:  # an engine that cannot take the model is skipped
                why = f"failed: {_first_line(e)}"
        if why is not None:
            if runtime != "auto":
                raise ExportError(f"--runtime {name}: {why}")
            rejected[name] = why
    probe_cl = probe.contiguous(memory_format=torch.channels_last)
    for name, engine in engines.items():
        speeds[name] = _rate(engine, probe_cl if name == "torch" else probe)
    winner = max(speeds, key=speeds.get) if runtime == "auto" else runtime
    if runtime == "auto":  # a named engine records no choice: it measured no contest
        _drop_losers(where, winner)
    if writable and runtime == "auto":
        with contextlib.suppress(OSError):
            data = {"runtime": winner, "speeds": speeds, "rejected": rejected, "probe": [h, w]}
            record.write_text(json.dumps(data, indent=2) + "\n")
    chosen = engines[winner]
    if scratch is not None and winner == "torch":
        scratch.cleanup()
    elif scratch is not None:  # the engine holds its files open; remove them at exit
        import atexit

        atexit.register(scratch.cleanup)
    return Choice(chosen, winner, "", speeds, rejected)


def _drop_losers(folder: Path, winner: str) -> None:
    """Keep only the winner's files: a converted model is as large as its weights."""
    files = {"onnxruntime": ("model.onnx",), "openvino": ("model.xml", "model.bin")}
    for name, names in files.items():
        if name != winner:
            for n in names:
                with contextlib.suppress(OSError):
                    (folder / n).unlink(missing_ok=True)


def _prepare(folder: Path) -> bool:
    """Whether the cache folder can be made and written (else a scratch folder is used)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


class _Raw(nn.Module):
    """The PyTorch model as `check_parity` takes a module (raw float in, logits out)."""

    preprocessing = False
    argmax = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last)).float()
