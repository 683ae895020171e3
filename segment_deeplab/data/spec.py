"""The dataset description (`dataset.yaml`): classes, ignore index, folders, splits.

A dataset is a folder with `images/` and `masks/` paired by file stem, described once
in `dataset.yaml` beside them. `num_classes` is derived from the class list and never
counts the ignore value.

Example `dataset.yaml`::

    ignore_index: 255
    classes:
      - {id: 0, name: background, color: [0, 0, 0]}
      - {id: 1, name: lesion, color: [255, 0, 0]}
    # optional: masks are RGB pictures whose colours are the class colours above
    color_masks: false
    # written by `deeplab prepare`:
    images: images          # relative to this file, or absolute
    masks: masks
    splits: {train: splits/train.txt, val: splits/val.txt}
    stats: {...}
    hash: sha256:...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segment_deeplab.atomic import write_text
from segment_deeplab.classes import ClassInfo, default_palette, to_dicts

SPEC_NAME = "dataset.yaml"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
MASK_EXTS = (".png",)


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file and the fix."""


@dataclass
class DatasetSpec:
    """A resolved dataset description with absolute folders."""

    classes: list[ClassInfo]
    image_dir: Path
    mask_dir: Path
    ignore_index: int = 255
    color_masks: bool = False
    # for colour masks: the colour that means "ignore"
    ignore_color: tuple[int, int, int] | None = None
    # split name -> absolute path of a text file with one stem per line
    splits: dict[str, Path] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    hash: str | None = None
    # the dataset.yaml this came from, or None when derived from the masks
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return [c.color for c in self.classes]

    def class_ids(self) -> list[int]:
        return [c.id for c in self.classes]

    def read_split(self, split: str) -> list[str]:
        if split not in self.splits:
            have = ", ".join(self.splits) or "none"
            hint = "run `deeplab prepare` on it first" if not self.splits else ""
            raise DatasetError(
                f"dataset {self.path or self.image_dir} has no split '{split}' (splits: {have})"
                + (f"; {hint}" if hint else "")
            )
        path = self.splits[split]
        if not path.is_file():
            raise DatasetError(f"split file {path} is missing; run `deeplab prepare` again")
        return [s.strip() for s in path.read_text().splitlines() if s.strip()]

    def to_yaml_dict(self, base: Path) -> dict[str, Any]:
        """The YAML form, with paths relative to `base` where they lie below it."""

        def rel(p: Path) -> str:
            try:
                return str(p.resolve().relative_to(base.resolve()))
            except ValueError:
                return str(p.resolve())

        d: dict[str, Any] = {
            "ignore_index": self.ignore_index,
            "classes": to_dicts(self.classes),
        }
        if self.color_masks:
            d["color_masks"] = True
        if self.ignore_color is not None:
            d["ignore_color"] = list(self.ignore_color)
        d["images"] = rel(self.image_dir)
        d["masks"] = rel(self.mask_dir)
        if self.splits:
            d["splits"] = {k: rel(v) for k, v in self.splits.items()}
        if self.stats:
            d["stats"] = self.stats
        if self.hash:
            d["hash"] = self.hash
        return d

    def save(self, path: Path) -> None:
        text = yaml.safe_dump(
            self.to_yaml_dict(path.parent), sort_keys=False, default_flow_style=None
        )
        write_text(path, text)


def _parse_classes(raw: Any, where: Path) -> list[ClassInfo]:
    if not isinstance(raw, list) or not raw:
        raise DatasetError(
            f"{where}: 'classes' must be a non-empty list of {{id, name, color}} entries"
        )
    classes = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or "name" not in item:
            raise DatasetError(f"{where}: classes[{i}] needs at least a name (and id, color)")
        cid = int(item.get("id", i))
        color = item.get("color") or default_palette(cid + 1)[cid]
        if not (isinstance(color, (list, tuple)) and len(color) == 3):
            raise DatasetError(f"{where}: classes[{i}] color must be [R, G, B], got {color!r}")
        classes.append(ClassInfo(cid, str(item["name"]), tuple(int(v) for v in color)))
    ids = [c.id for c in classes]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{where}: class ids repeat: {sorted(ids)}")
    if sorted(ids) != list(range(len(ids))):
        raise DatasetError(
            f"{where}: class ids must be 0..{len(ids) - 1} without gaps, got {sorted(ids)}; "
            "renumber them with `deeplab prepare --remap SRC:DST`"
        )
    return sorted(classes, key=lambda c: c.id)


def _parse_color(raw: Any, where: Path) -> tuple[int, int, int] | None:
    if raw is None:
        return None
    if not (isinstance(raw, (list, tuple)) and len(raw) == 3):
        raise DatasetError(f"{where}: ignore_color must be [R, G, B], got {raw!r}")
    return tuple(int(v) for v in raw)


def load_spec(path: Path) -> tuple[dict[str, Any], Path]:
    """Read a dataset.yaml and return its mapping and its folder."""
    if not path.is_file():
        raise DatasetError(f"dataset description not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with 'classes' and 'ignore_index'")
    return data, path.parent


def resolve_dataset(
    dataset: str | Path | None,
    images: str | Path | None = None,
    masks: str | Path | None = None,
    spec: str | Path | None = None,
) -> tuple[DatasetSpec | None, Path, Path, dict[str, Any]]:
    """Find the folders and the description of a dataset.

    Args:
        dataset: a dataset folder, or a dataset.yaml path; may be None when both
            `images` and `masks` are given.
        images, masks: folders laid out differently (override the description's).
        spec: a dataset.yaml kept elsewhere (read-only data folders).

    Returns:
        (spec or None when there is no description, image dir, mask dir, raw yaml dict)
    """
    root: Path | None = None
    spec_path: Path | None = Path(spec) if spec else None
    if dataset is not None:
        d = Path(dataset)
        if d.is_file() and d.suffix in (".yaml", ".yml"):
            spec_path = spec_path or d
            root = d.parent
        elif d.is_dir():
            root = d
            if spec_path is None and (d / SPEC_NAME).is_file():
                spec_path = d / SPEC_NAME
        else:
            raise DatasetError(f"dataset not found: {d} (give a folder with images/ and masks/)")
    raw: dict[str, Any] = {}
    base = root
    if spec_path is not None:
        raw, base = load_spec(spec_path)
        root = root or base

    def folder(explicit, key: str, default: str) -> Path:
        if explicit is not None:
            return Path(explicit)
        if key in raw:
            p = Path(raw[key])
            return p if p.is_absolute() else base / p
        if root is None:
            raise DatasetError(f"no {key} folder: give DATASET or --{key} DIR")
        return root / default

    image_dir, mask_dir = folder(images, "images", "images"), folder(masks, "masks", "masks")
    for name, p in (("images", image_dir), ("masks", mask_dir)):
        if not p.is_dir():
            raise DatasetError(
                f"{name} folder not found: {p}. A dataset is a folder with images/ and masks/; "
                f"use --images DIR --masks DIR for another layout"
            )
    if spec_path is None:
        return None, image_dir, mask_dir, raw
    return _described(raw, spec_path, base, image_dir, mask_dir), image_dir, mask_dir, raw


def _described(raw: dict, spec_path: Path, base: Path, image_dir: Path, mask_dir: Path):
    """The DatasetSpec of a dataset.yaml's mapping, its paths resolved against `base`."""
    splits = {
        k: (Path(v) if Path(v).is_absolute() else base / v)
        for k, v in (raw.get("splits") or {}).items()
    }
    return DatasetSpec(
        classes=_parse_classes(raw.get("classes"), spec_path),
        image_dir=image_dir,
        mask_dir=mask_dir,
        ignore_index=int(raw.get("ignore_index", 255)),
        color_masks=bool(raw.get("color_masks", False)),
        ignore_color=_parse_color(raw.get("ignore_color"), spec_path),
        splits=splits,
        stats=raw.get("stats") or {},
        hash=raw.get("hash"),
        path=spec_path,
    )


def open_dataset(dataset: str | Path, spec: str | Path | None = None) -> DatasetSpec:
    """A described dataset, ready for loading (used by train/eval)."""
    ds, *_ = resolve_dataset(dataset, spec=spec)
    if ds is None:
        raise DatasetError(
            f"{dataset} has no {SPEC_NAME}; run `deeplab prepare {dataset}` to write one"
        )
    return ds
