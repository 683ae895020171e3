"""Initialise a model from timm's pretrained weights or from the tensors of a weights file.

(`checkpoint.load_init_checkpoint` reads the file; this module matches its tensors.)
A local file may be a segment-deeplab checkpoint, a timm or torchvision backbone state
dict, or a whole-model state dict in a common container ({'state_dict': ...},
'module.' prefixes). Tensors are matched by name and shape: against the whole model
first, then against the backbone alone. Backbones whose naming differs (torchvision
mobilenets vs timm) are matched by order when every backbone shape lines up. Whatever
does not fit (e.g. a classifier for another number of classes) keeps its fresh init.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import huggingface_hub.constants as hub  # timm's own dependency: its hub client
import torch
import torch.nn as nn

from segment_deeplab.models.backbones import ModelError, create_features

# Where training code keeps the state dict inside a saved dict.
CONTAINER_KEYS = ("model", "state_dict", "model_state_dict", "model_state", "net", "module")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
BACKBONE = "backbone."


@dataclass
class InitSummary:
    """What an initialisation loaded: model keys loaded/missing, file keys skipped."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # skipped key -> why
    by_order: bool = False
    verbose: bool = False

    def __str__(self) -> str:
        how = " (backbone matched by order)" if self.by_order else ""
        line = f"init from {self.source}: loaded {len(self.loaded)} tensors{how}"
        if self.skipped:
            why = Counter(
                "shape mismatch" if k in self.reasons else "not in model" for k in self.skipped
            )
            line += (
                f", skipped {len(self.skipped)} ({', '.join(f'{n} {r}' for r, n in why.items())})"
            )
        if self.missing:
            parts = sorted({k.split(".")[0] for k in self.missing})
            line += f", missing {len(self.missing)} (fresh init: {', '.join(parts)})"
        if self.verbose:
            line += "".join(
                f"\n  skipped {k}: {self.reasons.get(k, 'not in model')}" for k in self.skipped
            )
            line += "".join(f"\n  missing {k}" for k in self.missing)
        return line


def _is_weight(key: str) -> bool:
    # BN's step counter is no weight; counting it would make summaries noisy.
    return not key.endswith("num_batches_tracked")


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def unwrap_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a saved dict: project checkpoint (its "model"), container or plain
    state dict, with DDP's and torch.compile's key prefixes taken off."""
    for _ in range(3):  # nested containers, e.g. {'model': {'state_dict': ...}}
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    return {
        _strip_wrappers(k): v
        for k, v in obj.items()
        if isinstance(v, torch.Tensor) and _is_weight(k)
    }


def _canon(key: str) -> str:
    # timm's features_only wrappers flatten 'stem.0' to 'stem_0'; compare both forms.
    return key.replace(".", "_")


def _match_by_name(
    targets: dict[str, torch.Tensor], source: dict[str, torch.Tensor]
) -> tuple[dict[str, str], dict[str, str]]:
    """Map model key -> file key; also file key -> reason for shape mismatches."""
    canon = {_canon(k): k for k in source}
    used: dict[str, str] = {}
    taken: set[str] = set()
    mismatched: dict[str, str] = {}
    for strip in (False, True):  # whole model first, then the backbone alone
        for key, t in targets.items():
            if key in used:
                continue
            if strip and not key.startswith(BACKBONE):
                continue
            name = key[len(BACKBONE) :] if strip else key
            src = name if name in source else canon.get(_canon(name))
            if src is None or src in taken:
                continue
            if source[src].shape != t.shape:
                mismatched[src] = f"shape {tuple(source[src].shape)} != {tuple(t.shape)}"
                continue
            used[key] = src
            taken.add(src)
            mismatched.pop(src, None)
    return used, mismatched


def _match_by_order(
    targets: dict[str, torch.Tensor], source: dict[str, torch.Tensor]
) -> dict[str, str]:
    """Backbone keys -> file keys when the backbone's shapes are a prefix of the file's."""
    keys = [k for k in targets if k.startswith(BACKBONE)]
    files = list(source)[: len(keys)]
    if len(files) < len(keys) or not keys:
        return {}
    if any(targets[k].shape != source[f].shape for k, f in zip(keys, files, strict=True)):
        return {}
    return dict(zip(keys, files, strict=True))


def load_state_dict_loose(
    model: nn.Module, source: dict[str, torch.Tensor], name: str, verbose: bool = False
) -> InitSummary:
    """Copy every tensor of `source` that fits `model` by name (or backbone order) and shape.

    Raises:
        ModelError: nothing in `source` fits the model.
    """
    targets = {k: v for k, v in model.state_dict().items() if _is_weight(k)}
    used, mismatched = _match_by_name(targets, source)
    by_order = False
    if not any(k.startswith(BACKBONE) for k in used):
        order = _match_by_order(targets, source)
        if order:
            used.update(order)
            by_order = True
    backbone = [k for k in targets if k.startswith(BACKBONE)]
    fitted = sum(k.startswith(BACKBONE) for k in used)
    # A backbone mostly left at random init is a wrong file or variant, not an init.
    if fitted * 2 < len(backbone):
        arch = getattr(model, "timm_name", "?")
        what = (
            f"nothing in {name} fits model '{arch}'"
            if not used
            else f"only {fitted} of {len(backbone)} backbone tensors of '{arch}' fit {name}"
        )
        raise ModelError(
            f"{what}: the file has e.g. {list(source)[:3]}, the backbone expects e.g. "
            f"{backbone[:3]}. Check that model.model_variant matches the file's architecture"
        )
    with torch.no_grad():
        for key, src in used.items():
            targets[key].copy_(source[src].to(targets[key].dtype))
    taken = set(used.values())
    skipped = [k for k in source if k not in taken]
    return InitSummary(
        source=name,
        loaded=list(used),
        skipped=skipped,
        missing=[k for k in targets if k not in used],
        reasons={k: mismatched[k] for k in skipped if k in mismatched},
        by_order=by_order,
        verbose=verbose,
    )


def _offline_help(name: str) -> str:
    return (
        f"could not get timm's pretrained weights for '{name}'. They come from the "
        "Hugging Face hub: this needs internet access or the weights in the local cache "
        "(~/.cache/huggingface, or $HF_HOME; HF_HUB_OFFLINE=1 reads the cache without "
        "trying the network). Offline, copy a weights file here and pass it instead: "
        "model.pretrained=false model.init_checkpoint=PATH (a timm or torchvision "
        "backbone state dict, .pth/.pt/.bin/.safetensors)"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a connection to the Hugging Face hub opens within `timeout` seconds (with
    a proxy configured, assume so: the proxy may reach what this machine cannot)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _cache_only(on: bool) -> Iterator[None]:
    """The hub client in offline mode (local cache only) while `on`."""
    if not on:
        yield
        return
    before, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def load_pretrained(model: nn.Module, verbose: bool = False) -> InitSummary:
    """Load timm's named pretrained weights into the model's backbone.

    Raises:
        ModelError: timm has no weights for the backbone, or they cannot be fetched.
    """
    name: str = model.timm_name
    cfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    if not any(cfg.get(k) for k in ("hf_hub_id", "url", "file")):
        raise ModelError(
            f"timm has no pretrained weights for '{name}'; use model.pretrained=false or "
            "model.init_checkpoint=PATH"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    # Without a way to the hub, read the local cache only: the hub client would retry
    # for about a minute before giving up.
    unreachable = not offline and not _hub_reachable()
    try:
        with _cache_only(unreachable):
            src = create_features(name, model.output_stride, pretrained=True)
    except ModelError:
        raise
    except Exception as e:  # hub, HTTP and file errors differ by library version
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        note = " (HF_HUB_OFFLINE is set)" if offline else ""
        note = " (the hub cannot be reached from here)" if unreachable else note
        raise ModelError(f"{_offline_help(name)}{note}. Cause: {detail}") from e
    source = {f"{BACKBONE}{k}": v for k, v in src.state_dict().items() if _is_weight(k)}
    return load_state_dict_loose(model, source, f"timm '{name}' pretrained", verbose)
