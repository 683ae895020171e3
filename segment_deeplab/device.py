"""Where the model runs and in which precision, decided once; torchrun's process group.

`pick_device` turns "auto" / "cpu" / "cuda:N" into a device, `autocast_dtype` the amp
setting into the dtype of the forward pass (bf16 where the hardware gains from it), and
`setup` joins the process group torchrun describes (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


class DeviceError(ValueError):
    """A device or precision that this machine cannot give; the message says which to use."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` takes CUDA when present, else the CPU."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory of freed CPU tensors for later ones.

    By default every block over 32 MB (a training step's activations and gradients at
    512x512) is mmap'ed and given back when freed, so the next step faults it in again,
    page by page: about 230,000 page faults and 0.7 s of system time per resnet_18 step
    at 512x512, batch 2. Served from the heap and not trimmed, the memory is reused.
    Process-wide, from this call on; forked data-loader workers inherit it. Returns
    whether it took (False off glibc, e.g. macOS or musl)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


@functools.cache
def has_amx() -> bool:
    """CPUs with AMX gain from bf16; others run it slower than fp32. Read once."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `amp` (auto, off, bf16, fp16) on `device`; None means fp32.

    `auto` is bf16 on GPUs that support it (fp16 on older ones) and on CPUs with AMX,
    fp32 elsewhere.
    """
    if amp not in AMP_CHOICES:
        raise DeviceError(f"amp must be one of {', '.join(AMP_CHOICES)}, not {amp!r}")
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16" if has_amx() else "off"
    if amp == "fp16" and device.type != "cuda":
        raise DeviceError("amp fp16 needs a CUDA device; use bf16 or off on the CPU")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def channels_last_pays(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether a training step gains from channels_last: on GPUs and under CPU autocast
    (oneDNN's bf16 path on AMX) it does; in fp32 on a CPU the convolutions' backward is
    slower in it (AMD EPYC, resnet_18 at 512x512, batch 2: 0.79x the peer's step
    channels_last, 0.92x contiguous, alternating in one process)."""
    return device.type != "cpu" or dtype is not None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """The autocast context for `autocast_dtype`'s answer (disabled for fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def dtype_name(dtype: torch.dtype | None) -> str:
    """'float32', 'bfloat16', ... as metrics.json records the forward pass."""
    return str(dtype or torch.float32).removeprefix("torch.")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or torch.compile) wrapper."""
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def setup(device: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=pick_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_checksums(model: nn.Module, info: DistInfo) -> list[float]:
    """One float64 checksum of all parameters per rank (equal when replicas agree).

    Batch-norm running statistics are left out: each rank updates them from its own
    batches, and DDP re-broadcasts rank 0's at every forward.
    """
    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in model.parameters())
    t = torch.tensor([float(total)], dtype=torch.float64, device=info.device)
    out = [torch.zeros_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t)
    return [float(x.item()) for x in out]


def broadcast_float(value: float, info: DistInfo) -> float:
    """Rank 0's value on every rank (e.g. its clock, so all ranks stop together)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.broadcast(t, src=0)
    return float(t.item())


def gather_objects(items: list) -> list:
    """Every rank's `items`, concatenated in rank order (just `items` without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for none)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")
