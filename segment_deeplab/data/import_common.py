"""What every `deeplab import FORMAT` shares: the dataset folder it writes, the class
list, the checks of an export against its images, and the overlap rule.

An importer reads an annotation tool's export and hands `DatasetWriter` one image
file (or its encoded bytes) and one array of class ids per image. The writer builds the
dataset in a hidden staging folder beside `--output` and moves it into place only when
every image was imported, so a failed import leaves nothing behind and never touches an
existing folder. Images are hard-linked (or copied with `--copy`, or across file
systems), never re-encoded; masks are written as palette PNGs of class ids.
"""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from segment_deeplab.atomic import OutputError, check_writable_dir, write_text
from segment_deeplab.classes import ClassInfo, default_palette, make_palette
from segment_deeplab.data.spec import IMAGE_EXTS, SPEC_NAME, DatasetError, DatasetSpec

IGNORE = 255
BACKGROUND = "background"
# Names annotation tools use for "no object" (labelme's `_background_`, CVAT's labelmap)
BACKGROUND_NAMES = ("background", "_background_", "__background__")
OVERLAP_RULES = ("later", "smaller", "ignore")
# An annotation point may lie this far outside the image (tools snap to pixel edges,
# and some export the far edge as width + 0.5) before it is an error.
EDGE_TOLERANCE = 1.0
MAX_LISTED = 10


class ImportProblems:
    """Every problem an import finds, so one run lists them all (up to MAX_LISTED)."""

    def __init__(self, source: Path | str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        n = len(self.items)
        shown = "\n  ".join(self.items[:MAX_LISTED])
        more = f"\n  ... and {n - MAX_LISTED} more" if n > MAX_LISTED else ""
        raise DatasetError(
            f"{self.source}: {n} problem{'s' * (n != 1)} in the export, nothing was "
            f"written:\n  {shown}{more}"
        )


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file as the project decodes it (EXIF rotation
    applied), from its header only."""
    with Image.open(path) as img:
        w, h = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
    return h, w


def image_size_of_bytes(data: bytes) -> tuple[int, int]:
    """`image_size` of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
    return h, w


def check_size(
    problems: ImportProblems, where: str, actual: tuple[int, int], declared: tuple[int, int]
) -> bool:
    """Record an error when an image's size is not the one its annotations were drawn
    on; returns whether it matched."""
    if tuple(actual) == tuple(declared):
        return True
    problems.add(
        where,
        f"the image is {actual[1]}x{actual[0]} but the export says {declared[1]}x"
        f"{declared[0]}; the annotations were made on another version of the image (re-"
        "export it, or put the annotated version beside the export)",
    )
    return False


def check_points(
    problems: ImportProblems, where: str, xy: np.ndarray, hw: tuple[int, int], min_points=3
) -> bool:
    """Record an error for a polygon with too few points or points outside the image."""
    if len(xy) < min_points:
        problems.add(where, f"a polygon needs at least {min_points} points, this one has {len(xy)}")
        return False
    h, w = hw
    x, y = xy[:, 0], xy[:, 1]
    out = (x < -EDGE_TOLERANCE) | (y < -EDGE_TOLERANCE)
    out |= (x > w + EDGE_TOLERANCE) | (y > h + EDGE_TOLERANCE)
    if out.any():
        px, py = xy[np.argmax(out)]
        problems.add(
            where,
            f"point ({px:g}, {py:g}) lies outside the {w}x{h} image; fix the shape in the "
            "annotation tool",
        )
        return False
    return True


@dataclass
class Shape:
    """One object's pixels and class, ready to be painted; `order` is the drawing order
    (z_order, then position in the export)."""

    mask: np.ndarray  # (H, W) bool
    class_id: int
    order: tuple = ()
    where: str = ""

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def paint(hw: tuple[int, int], shapes: Iterable[Shape], overlap: str) -> np.ndarray:
    """The (H, W) uint8 class-id mask of `shapes` on background 0.

    overlap:
        later: shapes are painted in `order`; a later one covers an earlier one (how
            CVAT, labelme and Label Studio draw them).
        smaller: larger shapes first, so a small object on a large one stays visible
            (ties in `order`).
        ignore: pixels covered by shapes of two different classes become 255.
    A shape of class 255 (crowd regions with `--crowd ignore`) is painted like any other.
    """
    if overlap not in OVERLAP_RULES:
        raise DatasetError(f"--overlap {overlap!r}: choose one of {', '.join(OVERLAP_RULES)}")
    out = np.zeros(hw, np.uint8)
    shapes = list(shapes)
    if overlap == "smaller":
        shapes.sort(key=lambda s: (-s.area, s.order))
    else:
        shapes.sort(key=lambda s: s.order)
    if overlap == "ignore":
        owner = np.full(hw, -1, np.int16)
        for s in shapes:
            clash = s.mask & (owner >= 0) & (owner != s.class_id)
            owner[s.mask & (owner < 0)] = s.class_id
            owner[clash] = IGNORE
        out[owner >= 0] = owner[owner >= 0]
        return out
    for s in shapes:
        out[s.mask] = s.class_id
    return out


def classes_from_names(names: Iterable[str], colors: dict[str, tuple] | None = None) -> list:
    """ClassInfo for background (id 0) followed by `names` in the order given; colours
    from `colors` where the export has them, else the VOC palette."""
    names = [n for n in names if n.lower() not in BACKGROUND_NAMES]
    pal = default_palette(len(names) + 1)
    colors = colors or {}
    bg = next((colors[k] for k in colors if k.lower() in BACKGROUND_NAMES), pal[0])
    out = [ClassInfo(0, BACKGROUND, tuple(bg))]
    for i, n in enumerate(names, start=1):
        out.append(ClassInfo(i, n, tuple(colors.get(n, pal[i]))))
    return out


def read_label_list(arg: str | None) -> list[str] | None:
    """`--labels`: a comma-separated list, or a text file with one name per line (like
    labelme's labels.txt); None when not given."""
    if arg is None:
        return None
    p = Path(arg)
    if p.is_file():
        names = [ln.strip() for ln in p.read_text().splitlines()]
    else:
        names = [n.strip() for n in arg.split(",")]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DatasetError(f"--labels {arg!r} names no classes")
    if len(set(names)) != len(names):
        raise DatasetError(f"--labels {arg!r} names a class twice")
    return names


def class_lookup(classes: list[ClassInfo]) -> dict[str, int]:
    """Class name -> id, the background names included."""
    out = {c.name: c.id for c in classes}
    for n in BACKGROUND_NAMES:
        out.setdefault(n, 0)
    return out


def parse_hex_color(text: str | None) -> tuple[int, int, int] | None:
    """'#fa3253' -> (250, 50, 83); None for anything else."""
    m = re.fullmatch(r"#?([0-9a-fA-F]{6})", (text or "").strip())
    if not m:
        return None
    v = m.group(1)
    return int(v[0:2], 16), int(v[2:4], 16), int(v[4:6], 16)


def stem_of(name: str) -> str:
    """The dataset stem of an image named in an export: its path without the extension,
    folders joined by '__' (so images in different folders stay apart)."""
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".")]
    if not parts:
        return ""
    parts[-1] = Path(parts[-1]).stem
    return "__".join(parts)


class DatasetWriter:
    """Writes images/, masks/, dataset.yaml (and splits/) of an imported dataset.

    Everything goes to a staging folder beside `output`; `finish` moves it into place
    (and `abort`, or an exception in a `with` block, removes it)."""

    def __init__(self, output: str | Path, classes: list[ClassInfo], copy: bool = False):
        self.output = Path(output)
        check_writable_dir(self.output)
        if self.output.exists() and any(self.output.iterdir()):
            raise OutputError(
                f"--output {self.output} is not empty; import writes a new dataset into a "
                "new folder (an existing one is never written over)"
            )
        if len(classes) > IGNORE:
            raise DatasetError(f"{len(classes)} classes: masks hold at most 255 (0..254)")
        self.classes = classes
        self.copy = copy
        self.stage = self.output.with_name(f".{self.output.name}.importing")
        shutil.rmtree(self.stage, ignore_errors=True)
        (self.stage / "images").mkdir(parents=True)
        (self.stage / "masks").mkdir()
        self.palette = make_palette(classes)
        self.stems: dict[str, str] = {}  # stem -> the source it came from
        self.splits: dict[str, list[str]] = {}

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    def claim(self, stem: str, source: str) -> None:
        """Reserve a stem; two images with one stem are an error naming both."""
        if not stem:
            raise DatasetError(f"{source}: an image without a file name")
        if stem in self.stems:
            raise DatasetError(
                f"{source} and {self.stems[stem]} both become '{stem}' in the dataset; "
                "rename one of them"
            )
        self.stems[stem] = source

    @staticmethod
    def _ext(name: str, source: str) -> str:
        ext = Path(name).suffix.lower()
        if ext not in IMAGE_EXTS:
            raise DatasetError(
                f"{source}: {ext or 'no extension'} images are not read; the dataset takes "
                f"{', '.join(IMAGE_EXTS)} (convert it to PNG first)"
            )
        return ".jpg" if ext == ".jpeg" else ext

    def add_image_file(self, stem: str, src: Path, split: str | None = None) -> None:
        """Link (or copy) `src` into images/ as STEM + its extension."""
        dst = self.stage / "images" / f"{stem}{self._ext(src.name, str(src))}"
        if not self.copy:
            try:
                dst.hardlink_to(src)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(src, dst)
        else:
            shutil.copyfile(src, dst)
        self._split(stem, split)

    def add_image_bytes(self, stem: str, data: bytes, name: str, split: str | None = None):
        """Write encoded image bytes as they are (never re-encoded)."""
        fmt = Image.open(io.BytesIO(data)).format  # the bytes' own format decides
        ext = {"JPEG": ".jpg", "PNG": ".png"}.get(fmt or "")
        if ext is None:
            self._ext(f"x.{(fmt or 'unknown').lower()}", name)  # raises, naming it
        (self.stage / "images" / f"{stem}{ext}").write_bytes(data)
        self._split(stem, split)

    def add_mask(self, stem: str, ids: np.ndarray) -> None:
        """Write an (H, W) uint8 array of class ids as a palette PNG."""
        write_mask(self.mask_path(stem), ids, self.palette)

    def mask_path(self, stem: str) -> Path:
        """Where the mask of `stem` goes (for workers that write masks themselves)."""
        return self.stage / "masks" / f"{stem}.png"

    def _split(self, stem: str, split: str | None) -> None:
        if split:
            self.splits.setdefault(split, []).append(stem)

    def finish(self, command: str, source: dict | None = None) -> DatasetSpec:
        """Write dataset.yaml (and splits/), then move the folder into place.

        `source` (the export's own ids of each class, say) is kept in dataset.yaml under
        `imported_from`."""
        if not self.stems:
            raise DatasetError("the export holds no images to import")
        split_files = {}
        for name, stems in self.splits.items():
            path = self.stage / "splits" / f"{name}.txt"
            path.parent.mkdir(exist_ok=True)
            path.write_text("".join(f"{s}\n" for s in sorted(stems)))
            split_files[name] = self.output / "splits" / f"{name}.txt"
        spec = DatasetSpec(
            classes=self.classes,
            image_dir=self.output / "images",
            mask_dir=self.output / "masks",
            ignore_index=IGNORE,
            splits=split_files,
            path=self.output / SPEC_NAME,
        )
        import yaml

        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        d = spec.to_yaml_dict(self.output)
        if source:
            d["imported_from"] = source
        body = yaml.safe_dump(d, sort_keys=False, default_flow_style=None)
        write_text(self.stage / SPEC_NAME, f"# written by `{command}` on {when}\n{body}")
        if self.output.exists():  # an empty folder (checked in __init__)
            self.output.rmdir()
        self.stage.rename(self.output)
        return spec


def write_mask(path: Path, ids: np.ndarray, palette: list[int]) -> None:
    """An (H, W) uint8 array of class ids as a palette PNG: the values are the ids, and
    viewers show the class colours."""
    img = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8))
    img.putpalette(palette)  # "L" becomes "P" with the values kept
    img.save(path)


def run_jobs(fn, jobs: list[tuple], progress: bool) -> list:
    """fn(*job) for every job over worker processes (small exports in this one)."""
    from segment_deeplab.data.pairs import parallel_map

    return parallel_map(fn, jobs, None, progress)


def palette_to_ids(rgb: np.ndarray, colors: dict[tuple[int, int, int], int]) -> np.ndarray:
    """(H, W, 3) uint8 colour mask -> (H, W) uint8 ids; unknown colours -> -1 marks, as
    int16, so the caller can name them."""
    key = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    out = np.full(key.shape, -1, np.int16)
    for (r, g, b), cid in colors.items():
        out[key == ((r << 16) | (g << 8) | b)] = cid
    return out


@dataclass
class ImportOptions:
    """The `deeplab import` flags every format shares."""

    # the folder the export's image names are relative to (None: found beside the export)
    images: Path | None = None
    # class names in id order after background (None: every label the export uses)
    labels: list[str] | None = None
    # later | smaller | ignore (None: the format's own rule, see each importer)
    overlap: str | None = None
    # crowd regions (COCO iscrowd): class | ignore | skip
    crowd: str = "class"
    # images without annotations: keep (all background) | skip
    empty: str = "keep"
    # copy images instead of hard-linking them
    copy: bool = False
    progress: bool = False
    # the command line, recorded in dataset.yaml
    command: str = "deeplab import"


def find_images_dir(names: list[str], candidates: list[Path], flag_hint: str) -> Path:
    """The candidate folder that holds the most of the first named images (a missing
    image is then reported by name); a DatasetError naming every folder tried when none
    holds any."""
    probe = [n for n in names[:20] if n]
    hits = [(sum((d / n).is_file() for n in probe), -i, d) for i, d in enumerate(candidates)]
    best = max(hits, default=(0, 0, None))
    if best[0] > 0:
        return best[2]
    tried = ", ".join(str(d) for d in dict.fromkeys(candidates))
    raise DatasetError(
        f"the images the export names (e.g. {probe[0] if probe else '?'}) are not in "
        f"{tried}; {flag_hint}"
    )


def resolve_image(root: Path, name: str) -> Path:
    """An image path named in an export, relative to `root` unless absolute."""
    p = Path(name)
    return p if p.is_absolute() else root / name
