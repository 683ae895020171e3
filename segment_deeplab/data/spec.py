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

import re
import shutil
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
    # a sharded dataset (`deeplab prepare --shards`): its manifest (data.shards.Manifest);
    # image_dir and mask_dir then name where the manifest is
    manifest: Any = None

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
        if self.manifest is not None:
            return [k for shard in self.manifest.shards(split) for k in shard.keys]
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
        """Write the description as a new file (a run's copy; see `write_description`)."""
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
        cid = _int(item.get("id", i), f"classes[{i}] id", where, 0, 255)
        color = item.get("color") or default_palette(cid + 1)[cid]
        classes.append(ClassInfo(cid, str(item["name"]), _rgb(color, f"classes[{i}] color", where)))
    ids = [c.id for c in classes]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{where}: class ids repeat: {sorted(ids)}")
    if sorted(ids) != list(range(len(ids))):
        raise DatasetError(
            f"{where}: class ids must be 0..{len(ids) - 1} without gaps, got {sorted(ids)}; "
            "renumber them with `deeplab prepare --remap SRC:DST`"
        )
    return sorted(classes, key=lambda c: c.id)


# The keys `deeplab prepare` writes; everything else in a dataset.yaml is the user's.
PREPARED_KEYS = ("images", "masks", "splits", "stats", "hash", "color_masks", "ignore_color")
PREPARED_MARK = "# ---- written by `deeplab prepare`; the lines above are yours, kept as they were"
_TOP_KEY = re.compile(r"^([A-Za-z_][\w-]*)\s*:")


def _without_keys(text: str, keys: tuple[str, ...]) -> str:
    """YAML text without the top-level blocks of `keys`; comments and the rest kept."""
    out, dropping = [], False
    for line in text.splitlines(keepends=True):
        top = _TOP_KEY.match(line)
        if top or (line[:1] not in (" ", "\t", "\n", "\r", "") and not line.isspace()):
            dropping = bool(top) and top.group(1) in keys  # a new block (or a top comment)
        if not dropping:
            out.append(line)
    return "".join(out)


def _backup(path: Path) -> Path:
    """A copy of the user's file beside it: NAME.bak, or NAME.bak.N if that is taken."""
    target, n = path.with_name(path.name + ".bak"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.bak.{n}"), n + 1
    shutil.copy2(path, target)
    return target


def write_description(spec: DatasetSpec, path: Path, keep_user_lines: bool) -> Path | None:
    """Write the prepared description to `path`, losing nothing of the user's.

    With `keep_user_lines` (the file is the user's own description), every line the
    user wrote stays as it was (comments included) and the keys `prepare` owns
    (`PREPARED_KEYS`) follow below `PREPARED_MARK`. A file without that mark (not yet
    touched by `prepare`, or not a description it wrote) is first copied to NAME.bak.

    Returns:
        The backup made, or None.
    """
    full = spec.to_yaml_dict(path.parent)
    user, backup = "", None
    if path.is_file():
        text = path.read_text()
        if PREPARED_MARK not in text:
            backup = _backup(path)
        if keep_user_lines:
            user = _without_keys(text.split(PREPARED_MARK)[0], PREPARED_KEYS).rstrip()
    ours = {k: v for k, v in full.items() if k in PREPARED_KEYS} if user else full
    dump = yaml.safe_dump(ours, sort_keys=False, default_flow_style=None)
    text = (f"{user}\n\n" if user else "") + f"{PREPARED_MARK}\n{dump}"
    try:
        same = yaml.safe_load(text) == {**(yaml.safe_load(user) or {} if user else {}), **ours}
    except yaml.YAMLError:
        same = False
    if not same:  # the user's lines do not combine cleanly: write it whole (backup kept)
        text = f"{PREPARED_MARK}\n" + yaml.safe_dump(full, sort_keys=False, default_flow_style=None)
    write_text(path, text)
    return backup


def _int(raw: Any, key: str, where: Path, lo: int, hi: int) -> int:
    """An integer setting of dataset.yaml in lo..hi, or a DatasetError naming it."""
    if isinstance(raw, bool) or not isinstance(raw, int) or not lo <= raw <= hi:
        raise DatasetError(f"{where}: {key} must be an integer in {lo}..{hi}, got {raw!r}")
    return raw


def _rgb(raw: Any, key: str, where: Path) -> tuple[int, int, int]:
    ok = isinstance(raw, (list, tuple)) and len(raw) == 3
    if not ok or any(
        isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255 for v in raw
    ):
        raise DatasetError(
            f"{where}: {key} must be [R, G, B] with values 0..255, e.g. [220, 20, 60]; got {raw!r}"
        )
    return tuple(raw)


def _parse_color(raw: Any, where: Path) -> tuple[int, int, int] | None:
    return None if raw is None else _rgb(raw, "ignore_color", where)


def _parse_ignore(raw: dict, classes: list[ClassInfo], where: Path) -> int:
    """ignore_index: a mask value (0..255) that no class uses."""
    ignore = _int(raw.get("ignore_index", 255), "ignore_index", where, 0, 255)
    same = next((c for c in classes if c.id == ignore), None)
    if same is not None:
        raise DatasetError(
            f"{where}: ignore_index {ignore} is also the id of class {same.name!r}; the ignore "
            "value must be one no class uses (TF DeepLab and this tool use 255)"
        )
    return ignore


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
            if not isinstance(raw[key], str):
                raise DatasetError(f"{spec_path}: {key} must be a folder path, got {raw[key]!r}")
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
    raw_splits = raw.get("splits") or {}
    if not isinstance(raw_splits, dict) or not all(isinstance(v, str) for v in raw_splits.values()):
        raise DatasetError(
            f"{spec_path}: splits must map split names to files, e.g. "
            f"{{train: splits/train.txt, val: splits/val.txt}}; got {raw_splits!r}"
        )
    splits = {k: (Path(v) if Path(v).is_absolute() else base / v) for k, v in raw_splits.items()}
    classes = _parse_classes(raw.get("classes"), spec_path)
    return DatasetSpec(
        classes=classes,
        image_dir=image_dir,
        mask_dir=mask_dir,
        ignore_index=_parse_ignore(raw, classes, spec_path),
        color_masks=bool(raw.get("color_masks", False)),
        ignore_color=_parse_color(raw.get("ignore_color"), spec_path),
        splits=splits,
        stats=raw.get("stats") or {},
        hash=raw.get("hash"),
        path=spec_path,
    )


def open_dataset(dataset: str | Path, spec: str | Path | None = None) -> DatasetSpec:
    """A described dataset, ready for loading (used by train/eval): a folder, its
    dataset.yaml, or the manifest of its shards (a path or URL, see data/stream.py)."""
    from segment_deeplab.data.stream import load_manifest, manifest_location

    location = manifest_location(dataset) if spec is None else None
    if location is not None:
        m = load_manifest(location)
        where = Path(location) if "://" in location else Path(location).parent
        return DatasetSpec(
            classes=m.classes,
            image_dir=where,
            mask_dir=where,
            ignore_index=m.ignore_index,
            splits={name: where for name in m.splits},
            stats=m.stats,
            hash=m.hash,
            manifest=m,
        )
    ds, *_ = resolve_dataset(dataset, spec=spec)
    if ds is None:
        raise DatasetError(
            f"{dataset} has no {SPEC_NAME}; run `deeplab prepare {dataset}` to write one"
        )
    return ds
