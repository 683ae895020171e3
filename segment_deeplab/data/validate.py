"""Check every image/mask pair of a dataset and report every problem, per file.

`validate_dataset` reads all pairs in parallel and returns a `ValidationReport`
(problems, per-class pixel and image counts, the pair list and file hashes) that
`deeplab prepare` reuses; `format_report` turns it into the text the CLI prints.
Pairing lives in `pairs.py`, reading one pair in `pair_check.py` (through `decode.py`,
the decoder training uses).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segment_deeplab.data.decode import MaskOptions, classify_unknown
from segment_deeplab.data.pair_check import FileResult, check_pair
from segment_deeplab.data.pairs import Pair, Problem, dataset_hash, pair_files, parallel_map
from segment_deeplab.data.spec import DatasetSpec

# Dataset-wide: a value with this share of its pixels strictly between their
# neighbours' values is a resampling artefact, not a class (only without dataset.yaml).
ARTEFACT_SHARE = 0.5
# The binary-mask trap: masks hold only 0 and the ignore value, or a declared class
# never occurs while this share of all pixels is ignored (0/255 masks read with
# ignore_index 255). Above the 5-10% of void that VOC or Cityscapes have.
TRAP_IGNORE_SHARE = 0.2


@dataclass
class ValidationReport:
    """Everything `validate_dataset` found; `prepare` builds on it."""

    image_dir: Path
    mask_dir: Path
    pairs: list[Pair]
    problems: list[Problem]
    # ids checked against: declared in dataset.yaml, or found in the masks
    class_ids: list[int]
    class_names: dict[int, str]
    ignore_index: int
    declared: bool
    # value -> pixels / images containing it, over all masks (after --remap)
    pixel_counts: dict[int, int] = field(default_factory=dict)
    image_counts: dict[int, int] = field(default_factory=dict)
    # (height, width) smallest and largest image
    size_min: tuple[int, int] | None = None
    size_max: tuple[int, int] | None = None
    # stem -> (sha256 of image bytes, sha256 of mask bytes)
    file_hashes: dict[str, tuple[str, str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def total_pixels(self) -> int:
        return sum(self.pixel_counts.values())

    def class_rows(self) -> list[dict[str, Any]]:
        """Per-class table rows: id, name, pixels, share of all pixels, images."""
        total = max(self.total_pixels, 1)
        rows = []
        for cid in self.class_ids:
            px = self.pixel_counts.get(cid, 0)
            rows.append(
                {
                    "id": cid,
                    "name": self.class_names.get(cid, f"class_{cid}"),
                    "pixels": px,
                    "share": px / total,
                    "images": self.image_counts.get(cid, 0),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`--json`)."""
        ignore_px = self.pixel_counts.get(self.ignore_index, 0)
        return {
            "ok": self.ok,
            "pairs": len(self.pairs),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "seconds": round(self.seconds, 3),
            "declared": self.declared,
            "ignore_index": self.ignore_index,
            "ignore_pixels": ignore_px,
            "ignore_share": ignore_px / max(self.total_pixels, 1),
            "classes": self.class_rows(),
            "problems": [asdict(p) for p in self.problems],
            "hash": dataset_hash(self.file_hashes) if self.file_hashes else None,
        }


def validate_dataset(
    spec: DatasetSpec | None,
    image_dir: Path,
    mask_dir: Path,
    *,
    remap: dict[int, int] | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> ValidationReport:
    """Read every pair and collect every problem.

    Args:
        spec: the dataset description, or None to check against the ids the masks hold.
        image_dir, mask_dir: the folders to pair by stem.
        remap: mask value -> new value, applied before any value check (`prepare --remap`).
        workers: reader processes (default: one per core).
        progress: show a progress bar on stderr.
    """
    t0 = time.perf_counter()
    pairs, problems = pair_files(Path(image_dir), Path(mask_dir))
    if not pairs and not any(p.level == "error" for p in problems):
        msg = (
            f"no image/mask pairs: {image_dir} and {mask_dir} hold no .jpg/.jpeg/.png files; "
            "put the images and their masks there (paired by file name)"
        )
        problems.append(Problem.error(str(image_dir), "no_pairs", msg))
    ignore = spec.ignore_index if spec else 255
    opts = MaskOptions.build(spec, ignore, remap)
    jobs = [(p.stem, p.image, p.mask, opts) for p in pairs]
    results: list[FileResult] = parallel_map(check_pair, jobs, workers, progress)
    for r in results:
        problems.extend(r.problems)
    report = ValidationReport(
        image_dir=Path(image_dir),
        mask_dir=Path(mask_dir),
        pairs=pairs,
        problems=problems,
        class_ids=spec.class_ids() if spec else [],
        class_names={c.id: c.name for c in spec.classes} if spec else {},
        ignore_index=ignore,
        declared=spec is not None,
        file_hashes={r.stem: (r.image_sha, r.mask_sha) for r in results if r.mask_sha},
    )
    _aggregate(report, results)
    report.seconds = time.perf_counter() - t0
    return report


def _aggregate(report: ValidationReport, results: list[FileResult]) -> None:
    """Dataset-wide counts and the checks that need every file at once."""
    counted = [r for r in results if r.values is not None]
    hist = np.zeros((256, 3), np.int64)  # pixels, on a boundary, between neighbours
    images = np.zeros(256, np.int64)
    for r in counted:
        hist[r.values] += r.stats
        images[r.values] += 1
    counts = hist[:, 0]
    ignore = report.ignore_index
    present = [int(v) for v in np.flatnonzero(counts)]
    if report.declared:
        allowed = set(report.class_ids) | {ignore}
    else:
        # No description: every value is a class, except the ignore value and values
        # that mostly sit between two other values (smoothing or resampling artefacts;
        # a thin real class, like a crack between background, is not "between").
        share = hist[:, 2] / np.maximum(counts, 1)
        artefacts = {v for v in present if v != ignore and share[v] >= ARTEFACT_SHARE}
        allowed = set(present) - artefacts
        report.class_ids = sorted(allowed - {ignore})
        report.class_names = {i: f"class_{i}" for i in report.class_ids}
    for r in counted:
        _check_values(report, r, allowed)
    report.pixel_counts = {v: int(counts[v]) for v in present}
    report.image_counts = {v: int(images[v]) for v in present}
    sizes = [r.size_hw for r in results if r.size_hw]
    if sizes:
        report.size_min = min(sizes, key=lambda s: s[0] * s[1])
        report.size_max = max(sizes, key=lambda s: s[0] * s[1])
    if counted:
        _check_classes(report)


def _check_values(report: ValidationReport, r: FileResult, allowed: set[int]) -> None:
    """Values of no class: thin boundary fringes (anti-aliasing) apart from the rest."""
    per = {int(v): (int(n), int(f)) for v, (n, f, _) in zip(r.values, r.stats, strict=True)}
    bad = [v for v in per if v not in allowed]
    thin = [v for v in bad if classify_unknown(*per[v])]
    n_thin, n_rest = sum(per[v][0] for v in thin), sum(per[v][0] for v in bad if v not in thin)
    if not classify_unknown(n_thin, sum(per[v][1] for v in thin), int(r.stats[:, 0].sum())):
        thin, n_thin, n_rest = [], 0, n_thin + n_rest  # too much of the mask for a fringe
    rest = [v for v in bad if v not in thin]
    name = f"masks/{r.mask_name}"
    if thin:
        msg = (
            f"{name}: {n_thin} pixels with values {_values(thin)} lie on region "
            "boundaries: the mask was resized or drawn with smoothing (anti-aliasing). "
            "Re-export it; resize masks with NEAREST (PIL Image.NEAREST, cv2.INTER_NEAREST)"
        )
        report.problems.append(Problem.error(r.mask_file, "antialiased", msg))
    if rest:
        msg = (
            f"{name}: {n_rest} pixels with values {_values(rest)} are neither "
            f"class ids ({_id_range(report.class_ids)}) nor ignore {report.ignore_index}; add "
            "classes to dataset.yaml, or map the values, e.g. "
            f"`deeplab prepare DATASET --remap {rest[0]}:{report.ignore_index}`"
        )
        report.problems.append(Problem.error(r.mask_file, "unknown_values", msg))


def _values(vals: list[int]) -> str:
    return ", ".join(map(str, vals[:12])) + (" ..." if len(vals) > 12 else "")


def _id_range(ids: list[int]) -> str:
    if not ids:
        return "none"
    return f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else str(ids)


def _check_classes(report: ValidationReport) -> None:
    """Absent classes, the 0/255 binary-mask trap, and gaps in the inferred ids."""
    ignore, counts = report.ignore_index, report.pixel_counts
    total = max(report.total_pixels, 1)
    ignore_share = counts.get(ignore, 0) / total
    absent = [c for c in report.class_ids if counts.get(c, 0) == 0]
    binary = ignore in counts and set(counts) <= {0, ignore}
    trap = binary or (absent and ignore_share >= TRAP_IGNORE_SHARE)
    dst = (absent or [1])[0]  # the class the ignored pixels most likely are
    if trap:
        report.problems.append(
            Problem.error(
                str(report.mask_dir),
                "binary_mask_trap",
                f"masks/: {ignore_share:.0%} of pixels are {ignore} (the ignore value) and "
                f"class {dst} never occurs: binary masks saved as 0/{ignore} lose their "
                f"foreground this way. Fix: `deeplab prepare DATASET --remap {ignore}:{dst}`",
            )
        )
    for c in absent:
        if not (trap and c == dst):
            name = report.class_names.get(c, f"class_{c}")
            report.problems.append(
                Problem.warning(
                    str(report.mask_dir),
                    "class_absent",
                    f"class {c} ({name}) is declared but no mask contains it; "
                    "check the ids, or drop the class from dataset.yaml",
                )
            )
    ids = report.class_ids
    if not report.declared and ids and ids != list(range(len(ids))):
        fix = " ".join(f"{s}:{d}" for d, s in enumerate(ids) if s != d)
        report.problems.append(
            Problem.warning(
                str(report.mask_dir),
                "noncontiguous_ids",
                f"masks/: the ids found ({ids}) are not 0..{len(ids) - 1}; class ids "
                f"must be contiguous: `deeplab prepare DATASET --remap {fix}`",
            )
        )


def format_report(report: ValidationReport, max_per_code: int = 10) -> str:
    """The human-readable report: problems grouped by code, class table, summary."""
    lines = []
    if not report.declared:
        ids = ", ".join(map(str, report.class_ids)) or "none"
        lines.append(
            f"no dataset.yaml: checked against the ids found in the masks ({ids}; "
            f"ignore {report.ignore_index}); `deeplab prepare` writes a description"
        )
    for level in ("error", "warning"):
        by_code: dict[str, list[Problem]] = {}
        for p in report.problems:
            if p.level == level:
                by_code.setdefault(p.code, []).append(p)
        for code, probs in by_code.items():
            lines.append(f"{level} {code} ({len(probs)}):")
            lines += [f"  {p.message}" for p in probs[:max_per_code]]
            if len(probs) > max_per_code:
                lines.append(f"  ... and {len(probs) - max_per_code} more (--json lists all)")
    lines += ["", *format_class_table(report), ""]
    n_err, n_warn = len(report.errors), len(report.warnings)
    verdict = "OK" if report.ok else "fix the errors above"
    lines.append(
        f"{len(report.pairs)} pairs checked in {report.seconds:.2f} s: "
        f"{n_err} error{'s' * (n_err != 1)}, {n_warn} warning{'s' * (n_warn != 1)}. {verdict}"
    )
    return "\n".join(lines)


def format_class_table(report: ValidationReport) -> list[str]:
    """id, name, pixels, share of all pixels, images containing the class."""
    rows = report.class_rows()
    total = max(report.total_pixels, 1)
    extra = [(report.ignore_index, "(ignore)")]
    extra += [
        (v, "(not a class)") for v in sorted(report.pixel_counts) if v not in report.class_ids
    ]
    seen = set()
    for v, name in extra:
        if v not in seen and (v in report.pixel_counts or v == report.ignore_index):
            seen.add(v)
            px = report.pixel_counts.get(v, 0)
            images = report.image_counts.get(v, 0)
            rows.append(
                {"id": v, "name": name, "pixels": px, "share": px / total, "images": images}
            )
    width = max([len(r["name"]) for r in rows] + [4])
    out = [f"{'id':>4}  {'name':<{width}}  {'pixels':>14}  {'share':>7}  {'images':>6}"]
    for r in rows:
        out.append(
            f"{r['id']:>4}  {r['name']:<{width}}  {r['pixels']:>14,}  "
            f"{r['share']:>7.2%}  {r['images']:>6}"
        )
    return out
