"""Pair the files of images/ and masks/ by stem, and map work over the pairs in parallel.

`a.jpg` in images/ pairs with `a.png` in masks/. Files without a partner and two
files sharing a stem in one folder are problems, reported per file.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from segment_deeplab.data.spec import IMAGE_EXTS

# Fewer pairs than this are read in-process: starting workers would cost more.
MIN_POOL_JOBS = 48


@dataclass
class Problem:
    """One finding. `code` is a stable string for scripts and tests."""

    level: str  # "error" | "warning"
    file: str
    code: str
    message: str

    @classmethod
    def error(cls, file: Path | str, code: str, message: str) -> Problem:
        return cls("error", str(file), code, message)

    @classmethod
    def warning(cls, file: Path | str, code: str, message: str) -> Problem:
        return cls("warning", str(file), code, message)


@dataclass
class Pair:
    stem: str
    image: Path
    mask: Path


def index_stems(folder: Path, kind: str, problems: list[Problem]) -> dict[str, Path]:
    """stem -> file for the image files (.jpg/.jpeg/.png, any case) of a folder.

    The one stem index: validation and the training dataset both pair files with it.
    Hidden files are passed over, other files are warnings, and a stem shared by two
    files is an error (the pair would be ambiguous) and left out of the index.
    """
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() not in IMAGE_EXTS:
            msg = f"{kind}/{p.name}: not a .jpg/.jpeg/.png file, skipped"
            problems.append(Problem.warning(p, "unsupported_file", msg))
            continue
        by_stem.setdefault(p.stem, []).append(p)
    out = {}
    for stem, files in by_stem.items():
        if len(files) == 1:
            out[stem] = files[0]
            continue
        names = ", ".join(f.name for f in files)
        msg = (
            f"{kind}/: {names} share the stem '{stem}', so the pair is ambiguous; "
            "keep one file per stem"
        )
        problems.append(Problem.error(files[0], "duplicate_stem", msg))
    return out


def pair_files(image_dir: Path, mask_dir: Path) -> tuple[list[Pair], list[Problem]]:
    """Pair images/ and masks/ by file stem; lone files and repeated stems are errors."""
    problems: list[Problem] = []
    images = index_stems(image_dir, "images", problems)
    masks = index_stems(mask_dir, "masks", problems)
    dup = {Path(p.file).stem for p in problems if p.code == "duplicate_stem"}
    for stem in sorted(images.keys() - masks.keys() - dup):
        msg = f"images/{images[stem].name} has no mask: add masks/{stem}.png or move the image out"
        problems.append(Problem.error(images[stem], "missing_mask", msg))
    for stem in sorted(masks.keys() - images.keys() - dup):
        msg = (
            f"masks/{masks[stem].name} has no image named {stem}.jpg/.png: "
            "add it or move the mask out"
        )
        problems.append(Problem.error(masks[stem], "missing_image", msg))
    pairs = [Pair(s, images[s], masks[s]) for s in sorted(images.keys() & masks.keys())]
    return pairs, problems


def dataset_hash(file_hashes: dict[str, tuple[str, str]]) -> str:
    """sha256 over the sorted (stem, image sha256, mask sha256) triples."""
    h = hashlib.sha256()
    for stem in sorted(file_hashes):
        img, msk = file_hashes[stem]
        h.update(f"{stem}\t{img}\t{msk}\n".encode())
    return "sha256:" + h.hexdigest()


def parallel_map(fn: Callable, jobs: list[tuple], workers: int | None, progress: bool) -> list:
    """fn(*job) for every job, in order, over worker processes, with a progress bar.

    Processes, not threads: on CamVid (2 cores) they were ~15% faster, and the
    numpy work per mask holds the GIL, so threads stop scaling on bigger machines.
    Small jobs run in this process, where a pool would cost more than it saves.
    """
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), disable=not progress, file=sys.stderr, unit="pair", leave=False)
    out = []
    if workers <= 1 or len(jobs) < MIN_POOL_JOBS:
        for job in jobs:
            out.append(fn(*job))
            bar.update()
    else:
        chunk = max(1, min(16, len(jobs) // (4 * workers)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for res in pool.map(fn, *zip(*jobs, strict=True), chunksize=chunk):
                out.append(res)
                bar.update()
    bar.close()
    return out
