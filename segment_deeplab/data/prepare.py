"""Turn a checked folder of images and masks into a described, split dataset.

`prepare_dataset` validates (with `--remap` applied first), refuses on errors, then
writes a seeded train/val split, class statistics and a content hash into
`dataset.yaml`. Remapped or colour masks are written as new index PNGs into
`<output>/masks_prepared/`; the user's files are never modified.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from segment_deeplab.atomic import check_writable_dir, write_bytes, write_text
from segment_deeplab.classes import placeholder_classes
from segment_deeplab.data.decode import MaskOptions, read_mask
from segment_deeplab.data.pairs import dataset_hash, parallel_map
from segment_deeplab.data.spec import (
    SPEC_NAME,
    DatasetError,
    DatasetSpec,
    resolve_dataset,
    write_description,
)
from segment_deeplab.data.validate import ValidationReport, validate_dataset

PREPARED_MASKS = "masks_prepared"


class ValidationFailed(DatasetError):
    """Validation found errors; `report` holds them all."""

    def __init__(self, report: ValidationReport) -> None:
        n = len(report.errors)
        super().__init__(f"validation found {n} error{'s' * (n != 1)}; nothing was written")
        self.report = report


@dataclass
class PrepareResult:
    spec: DatasetSpec
    spec_path: Path
    train: list[str]
    val: list[str]
    report: ValidationReport
    # True when no description existed and classes are placeholders (class_<id>)
    placeholders: bool
    # folder of masks written by --remap / colour conversion, else None
    converted_masks: Path | None
    # the copy of a dataset.yaml kept before it was first updated, else None
    backup: Path | None = None
    # with --group-by: {"train": [group, ...], "val": [group, ...]}
    groups: dict[str, list[str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`--json`)."""
        return {
            "ok": True,
            "dataset_yaml": str(self.spec_path),
            "train": len(self.train),
            "val": len(self.val),
            "placeholders": self.placeholders,
            "masks": str(self.spec.mask_dir),
            "converted_masks": self.converted_masks is not None,
            "backup": str(self.backup) if self.backup else None,
            "hash": self.spec.hash,
            "stats": self.spec.stats,
            "warnings": [asdict(p) for p in self.report.warnings],
            "groups": self.groups,
        }


def parse_remap(items: list[str] | None) -> dict[int, int]:
    """["255:1", "3:255"] -> {255: 1, 3: 255}; values are 8-bit mask values."""
    out: dict[int, int] = {}
    for item in items or []:
        try:
            src, dst = (int(v) for v in item.split(":"))
        except ValueError:
            raise DatasetError(f"--remap {item!r}: expected SRC:DST, e.g. 255:1") from None
        if not (0 <= src <= 255 and 0 <= dst <= 255):
            raise DatasetError(f"--remap {item}: mask values are 0..255")
        if src in out:
            raise DatasetError(f"--remap maps {src} twice")
        out[src] = dst
    return out


def _ordered(keys: list[str], seed: int) -> list[str]:
    return sorted(keys, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())


def parse_group_by(pattern: str | None) -> re.Pattern | None:
    """`--group-by REGEX` compiled, or a DatasetError that names the pattern."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise DatasetError(f"--group-by {pattern!r} is no regular expression: {e}") from None


def group_of(stem: str, group_by: re.Pattern) -> str | None:
    """The group a stem belongs to: the regex's first capture group, or its whole match
    when it has none (searched anywhere in the stem); None when it does not match."""
    m = group_by.search(stem)
    if m is None:
        return None
    return m.group(1) if group_by.groups else m.group(0)


def group_stems(stems: list[str], group_by: re.Pattern) -> dict[str, list[str]]:
    """{group: stems}; every stem must match, and at least two groups must exist."""
    groups: dict[str, list[str]] = {}
    missed = []
    for s in stems:
        g = group_of(s, group_by)
        if g is None or g == "":
            missed.append(s)
        else:
            groups.setdefault(g, []).append(s)
    if missed:
        shown = ", ".join(missed[:3]) + (f" and {len(missed) - 3} more" if len(missed) > 3 else "")
        raise DatasetError(
            f"--group-by {group_by.pattern!r} does not name a group in {len(missed)} file "
            f"name{'s' * (len(missed) != 1)} ({shown}); write a pattern that matches every "
            "stem, e.g. '^([^_]+)_' for names like SEQ_FRAME"
        )
    if len(groups) < 2 and stems:
        raise DatasetError(
            f"--group-by {group_by.pattern!r} puts all {len(stems)} pairs in one group "
            f"({next(iter(groups), '')!r}); a held-out split needs at least two groups"
        )
    return groups


def make_split(
    stems: list[str], val_fraction: float, seed: int, group_by: re.Pattern | None = None
) -> tuple[list[str], list[str]]:
    """A reproducible train/val split, each side sorted.

    Stems are ordered by a seeded hash, not a shuffle, so the split does not depend
    on Python's RNG and adding files moves few existing ones across.

    With `group_by`, whole groups (a video sequence, a patient, a site: what the regex
    names, see `group_of`) go to one side: groups are taken in seeded order, and each
    joins val when that brings val closer to `val_fraction` of the pairs (at least one
    group goes to val, the smallest if none brings it closer, and one always stays in
    train).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if group_by is not None and val_fraction > 0 and stems:
        groups = group_stems(stems, group_by)
        target = len(stems) * val_fraction
        val_groups: list[str] = []
        n_val = 0
        order = _ordered(list(groups), seed)
        for g in order:
            n = len(groups[g])
            if len(val_groups) < len(groups) - 1 and abs(n_val + n - target) < abs(n_val - target):
                val_groups.append(g)
                n_val += n
        if not val_groups:  # every group is far larger than the target: the smallest
            val_groups = [min(order, key=lambda g: len(groups[g]))]
        val = [s for g in val_groups for s in groups[g]]
        train = [s for g in order if g not in val_groups for s in groups[g]]
        return sorted(train), sorted(val)
    order = _ordered(stems, seed)
    n_val = round(len(order) * val_fraction)
    if val_fraction > 0 and len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def class_stats(report: ValidationReport) -> dict[str, Any]:
    """The `stats:` block: pairs, image sizes, ignore share, per-class counts."""
    total = max(report.total_pixels, 1)
    rows = [dict(r, share=round(r["share"], 6)) for r in report.class_rows()]
    return {
        "pairs": len(report.pairs),
        "image_size_hw": {
            "min": list(report.size_min or ()),
            "max": list(report.size_max or ()),
        },
        "ignore_share": round(report.pixel_counts.get(report.ignore_index, 0) / total, 6),
        # pixels per class in id order: what `class_weights: auto` weighs the loss by
        "class_pixels": [r["pixels"] for r in rows],
        "classes": rows,
    }


def output_dir(dataset, output, spec: DatasetSpec | None, image_dir: Path) -> Path:
    if output is not None:
        return Path(output)
    if dataset is not None:
        d = Path(dataset)
        return d if d.is_dir() else d.parent
    return spec.path.parent if spec and spec.path else image_dir.parent


def _contiguous_ids(report: ValidationReport) -> list[int]:
    ids = report.class_ids
    if not ids:
        raise DatasetError(f"no class ids found in {report.mask_dir}")
    if ids != list(range(len(ids))):
        fix = " ".join(f"{s}:{d}" for d, s in enumerate(ids) if s != d)
        raise DatasetError(
            f"the masks hold ids {ids}, but class ids must be 0..{len(ids) - 1}; "
            f"renumber them with `deeplab prepare ... --remap {fix}`"
        )
    return ids


def convert_mask(src: Path, dst: Path, opts: MaskOptions) -> str:
    """Write `src` as a mode-L PNG of class ids at `dst`; returns its sha256."""
    try:
        ids = read_mask(src, opts)
    except DatasetError as e:  # validation passed, so the file changed meanwhile
        raise DatasetError(f"{e}; it changed while preparing: run `deeplab prepare` again") from e
    buf = io.BytesIO()
    Image.fromarray(ids).save(buf, format="PNG")
    data = buf.getvalue()
    write_bytes(dst, data)
    return hashlib.sha256(data).hexdigest()


def _convert_all(report: ValidationReport, opts: MaskOptions, target: Path, workers, progress):
    """New masks into `target` (replaced whole, so no stale files stay), mask hashes."""
    if report.mask_dir.resolve() == target.resolve():
        raise DatasetError(
            f"the masks already live in {target}; give --output DIR to convert them again"
        )
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    jobs = [(p.mask, tmp / f"{p.stem}.png", opts) for p in report.pairs]
    hashes = parallel_map(convert_mask, jobs, workers, progress)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return {p.stem: h for p, h in zip(report.pairs, hashes, strict=True)}


def prepare_dataset(
    dataset: str | Path | None,
    *,
    images: str | Path | None = None,
    masks: str | Path | None = None,
    spec: str | Path | None = None,
    output: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    remap: dict[int, int] | None = None,
    group_by: str | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> PrepareResult:
    """Validate, split, count and describe a dataset; see the module docstring.

    Raises:
        ValidationFailed: validation found errors (nothing is written).
        DatasetError: unusable input.
        OutputError: an output folder that is a file or cannot be written.
    """
    ds, image_dir, mask_dir, _ = resolve_dataset(dataset, images, masks, spec)
    out_dir = output_dir(dataset, output, ds, image_dir)
    check_writable_dir(out_dir)  # refused before the long pass, with the folder named
    pattern = parse_group_by(group_by)
    make_split([], val_fraction, seed)  # checks the fraction before the long pass
    report = validate_dataset(
        ds, image_dir, mask_dir, remap=remap, workers=workers, progress=progress
    )
    if not report.ok:
        raise ValidationFailed(report)
    if not report.pairs:
        raise DatasetError(f"no image/mask pairs in {image_dir} and {mask_dir}")
    classes = ds.classes if ds else placeholder_classes(_contiguous_ids(report))
    ignore = report.ignore_index
    file_hashes = dict(report.file_hashes)
    converted = None
    if remap or (ds and ds.color_masks):
        opts = MaskOptions.build(ds, ignore, remap)
        converted = out_dir / PREPARED_MASKS
        for stem, h in _convert_all(report, opts, converted, workers, progress).items():
            file_hashes[stem] = (file_hashes[stem][0], h)
    stems = [p.stem for p in report.pairs]
    train, val = make_split(stems, val_fraction, seed, pattern)
    if pattern is not None:
        val_set = set(val)
        groups = {
            "train": sorted({group_of(s, pattern) for s in stems if s not in val_set}),
            "val": sorted({group_of(s, pattern) for s in val_set}),
        }
    else:
        groups = None
    split_dir = out_dir / "splits"
    split_dir.mkdir(parents=True, exist_ok=True)
    for name, stems in (("train", train), ("val", val)):
        write_text(split_dir / f"{name}.txt", "".join(f"{s}\n" for s in stems))
    # The description is updated where it lives when that is the output folder: the
    # user's lines are kept, and the file backed up the first time (`write_description`).
    spec_path = out_dir / SPEC_NAME
    own = ds is not None and ds.path is not None and ds.path.parent.resolve() == out_dir.resolve()
    if own:
        spec_path = ds.path
    new = DatasetSpec(
        classes=classes,
        image_dir=image_dir,
        mask_dir=converted or mask_dir,
        ignore_index=ignore,
        color_masks=False,  # colour masks were converted to ids above
        splits={"train": split_dir / "train.txt", "val": split_dir / "val.txt"},
        stats={
            **class_stats(report),
            "split": {"seed": seed, "val_fraction": val_fraction, "group_by": group_by},
        },
        hash=dataset_hash(file_hashes),
        path=spec_path,
    )
    backup = write_description(new, spec_path, keep_user_lines=own)
    return PrepareResult(new, spec_path, train, val, report, ds is None, converted, backup, groups)
