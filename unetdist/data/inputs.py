"""Finding the user's image/label files (globs or CSV/YAML lists) and reading small ones whole.

Shard writing reads images lazily, band by band, through `readers.open_image` and `regions`
(frames x channels x H x W, any size); what remains here is finding the files and the whole-file
helpers that evaluation and prediction use for small TIFF/PNG/.npy files.

Axes: every image gets an axes string over T (frames: each one a separate 2-D image), C
(channels), Y and X. With `axes="auto"`, TIFF files use the axes tifffile reads from their
metadata (ImageJ, OME, shaped): C and S (samples, e.g. RGB) are channels, and any other
non-spatial axis (T, Z, Q for a plain multi-page file, ...) holds frames. Other files: 2-D is YX;
3-D is YXC when the last axis has at most 4 entries and the first more than 4 (an RGB PNG),
otherwise CYX; more dimensions need an explicit `axes` (e.g. "TCYX"). Labels have the same
frames as their image and no channel axis (a channel axis of size 1 is dropped).
"""

from __future__ import annotations

import csv
import glob
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import yaml

from unetdist.data.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".tif", ".tiff", ".npy", ".png")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Pair:
    """An image file, its label file, and a split forced by the input list (None: chosen by seed)."""

    image: Path
    label: Path
    split: str | None = None


MASK_SUFFIX = "_masks"  # cellpose's convention: img.tif <-> img_masks.tif
_WILDCARD = re.compile(r"\*+|\?|\[[^\]]*\]")
KeyFn = Callable[[Path], str]


def name_key(pattern: str | None = None, suffix: str = "") -> KeyFn:
    """The name a file is paired by: what the wildcards of `pattern`'s file-name part matched
    (``img_*.tif``: ``img_07.tif`` -> ``07``), or the whole name; then without its image
    extension (and ``.ome``) and without `suffix` when it ends with it (``x1_masks`` -> ``x1``)."""
    prefix = affix = ""
    if pattern:
        name = Path(pattern).name
        wild = list(_WILDCARD.finditer(name))
        if wild:
            prefix, affix = name[: wild[0].start()], name[wild[-1].end():]

    def key(path: Path) -> str:
        name = path.name
        if prefix or affix:
            if name.startswith(prefix) and name.endswith(affix) and len(name) > len(prefix) + len(affix):
                name = name[len(prefix): len(name) - len(affix)]
        for ext in (*SUFFIXES, ".ome"):
            if name.lower().endswith(ext):
                name = name[: -len(ext)]
        return name[: -len(suffix)] if suffix and name.endswith(suffix) and len(name) > len(suffix) else name

    return key


class PairingError(DataError):
    """Files that cannot be paired; `unpaired` counts them (to report the closer of two pairing rules)."""

    def __init__(self, message: str, unpaired: int) -> None:
        super().__init__(message)
        self.unpaired = unpaired


def _listing(paths: list[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:8])
    return shown + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")


def pair_by_name(images: list[Path], labels: list[Path], image_key: KeyFn | None = None,
                 label_key: KeyFn | None = None, what: tuple[str, str] = ("image", "mask")) -> list[tuple[Path, Path]]:
    """Pairs (image, label) matched by name (`name_key`), in the order of `images`.

    By default a label belongs to the image whose name it is with ``_masks`` added (cellpose:
    ``x1.tif`` <-> ``x1_masks.tif``), or to the image of the same name (two folders). Files in both
    lists count as labels. Never by position: an image without a label, a label without an image,
    or two files with one name are an error listing them.
    """
    image_key, label_key = image_key or name_key(), label_key or name_key(None, MASK_SUFFIX)
    label_set = {Path(p) for p in labels}
    images = [Path(p) for p in images if Path(p) not in label_set]
    keyed: dict[str, dict[str, list[Path]]] = {}
    for side, paths, key in (("image", images, image_key), ("label", sorted(label_set), label_key)):
        for path in paths:
            keyed.setdefault(key(path), {"image": [], "label": []})[side].append(path)
    problems, unpaired = [], 0
    for side, other, name, other_name in (("image", "label", *what), ("label", "image", *what[::-1])):
        dupes = sorted(p for group in keyed.values() if len(group[side]) > 1 for p in group[side])
        lonely = sorted(p for group in keyed.values() if not group[other] for p in group[side])
        if dupes:
            problems.append(f"{name}s with the same name: {_listing(dupes)}")
        if lonely:
            problems.append(f"{len(lonely)} {name}(s) without their {other_name}: {_listing(lonely)}")
        unpaired += len(dupes) + len(lonely)
    if problems:
        raise PairingError("; ".join(problems) + f" ({what[1]}s are paired with {what[0]}s by name: NAME.tif with "
                           f"NAME{MASK_SUFFIX}.tif or with NAME.tif in another folder, or by what the globs' * "
                           "match)", unpaired)
    return [(path, keyed[image_key(path)]["label"][0]) for path in images]


def pair_files(images: list[Path], labels: list[Path], image_glob: str | None = None, label_glob: str | None = None,
               label_suffix: str = MASK_SUFFIX, image_suffix: str = "",
               what: tuple[str, str] = ("image", "label")) -> list[tuple[Path, Path]]:
    """`pair_by_name` by the files' names; when that leaves files unpaired, by what the globs' wildcards
    matched (``img_*.tif`` with ``lbl_*.tif``); one image and one label given together are a pair
    whatever their names (there is nothing to mix up). The error lists the files the names leave unpaired."""
    try:
        return pair_by_name(images, labels, name_key(None, image_suffix), name_key(None, label_suffix), what)
    except PairingError as by_name:
        if len(images) == 1 and len(labels) == 1:
            return [(images[0], labels[0])]
        if not (image_glob or label_glob):
            raise
        try:
            return pair_by_name(images, labels, name_key(image_glob, image_suffix), name_key(label_glob, label_suffix),
                                what)
        except PairingError as by_glob:
            raise (by_glob if by_glob.unpaired < by_name.unpaired else by_name) from None


def read_pairs(images_glob: str, labels_glob: str, mask_suffix: str = MASK_SUFFIX) -> list[tuple[Path, Path]]:
    """Image and label files from two globs, paired by name (see `name_key`, `pair_by_name`), sorted by image."""
    images = sorted(glob.glob(images_glob, recursive=True))
    labels = sorted(glob.glob(labels_glob, recursive=True))
    for pattern, found, what in ((images_glob, images, "images"), (labels_glob, labels, "labels")):
        if not found:
            raise DataError(f"no files match the {what} glob {pattern!r} (quote it so the shell does not expand it)")
    return pair_files([Path(i) for i in images], [Path(l) for l in labels], images_glob, labels_glob, mask_suffix)


def read_list(path: str | Path) -> list[Pair]:
    """Pairs from a CSV (header `image,label[,split]`) or YAML list of {image, label[, split]} mappings.

    Relative paths are relative to the list file's folder; `split` is `train` or `val` (or empty).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"cannot read the input list {path}: {exc}") from exc
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            rows = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DataError(f"{path} is not valid YAML: {exc}") from exc
        if isinstance(rows, dict) and "pairs" in rows:
            rows = rows["pairs"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected a list of mappings with keys image, label (and optionally split)")
    elif path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        raise DataError(f"{path}: an input list must be .csv, .yaml or .yml")
    pairs = [_row_pair(row, number, path) for number, row in enumerate(rows, start=1)]
    if not pairs:
        raise DataError(f"the input list {path} holds no image/label pairs")
    return pairs


def _row_pair(row: dict, number: int, path: Path) -> Pair:
    missing = [k for k in ("image", "label") if not row.get(k)]
    if missing:
        raise DataError(f"{path}, entry {number}: missing {' and '.join(missing)} (columns: image, label, split)")
    split = str(row.get("split") or "").strip().lower() or None
    if split is not None and split not in SPLITS:
        raise DataError(f"{path}, entry {number}: split {split!r} must be train, val or empty")
    base = path.parent
    return Pair(image=base / str(row["image"]).strip(), label=base / str(row["label"]).strip(), split=split)


def as_pairs(items: list[Pair] | list[tuple[Path, Path]]) -> list[Pair]:
    return [item if isinstance(item, Pair) else Pair(Path(item[0]), Path(item[1])) for item in items]


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .tif/.tiff, .npy or .png")
    return suffix


def load_array(path: Path) -> np.ndarray:
    """Read .tif/.tiff, .npy or .png without changing its dtype (.npy memory-mapped)."""
    suffix = _check_suffix(path)
    try:
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if suffix == ".png":
            return read_png(path)
        return tifffile.imread(path)
    except DataError:
        raise
    except Exception as exc:  # tifffile, numpy and Pillow raise many types; name the file
        raise DataError(f"cannot read {path}: {exc}") from exc


def array_header(path: Path) -> tuple[tuple[int, ...], np.dtype, str | None]:
    """Shape, dtype and (TIFF only) metadata axes of a file, reading as little as possible."""
    suffix = _check_suffix(path)
    try:
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return tuple(array.shape), array.dtype, None
        if suffix == ".png":
            array = read_png(path)  # PNG headers do not give numpy's view of the mode reliably
            return tuple(array.shape), array.dtype, None
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return tuple(series.shape), np.dtype(series.dtype), str(series.axes)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def read_png(path: Path) -> np.ndarray:
    """A PNG's pixels as stored (16-bit stays 16-bit); palette images are refused."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError(f"{path}: reading PNG needs Pillow (pip install pillow), or convert to .tif/.npy") from exc
    with Image.open(path) as img:
        if img.mode in ("P", "PA"):
            raise DataError(f"{path}: palette PNG; save it as grayscale or RGB")
        return np.array(img)  # I;16 gives uint16, L/RGB uint8: never an 8-bit conversion of 16-bit data


def image_axes(path: Path, shape: tuple[int, ...], tiff_axes: str | None, setting: str) -> str:
    """The image's axes over T, C, Y, X (one letter per dimension; T and C may be absent)."""
    if setting.lower() != "auto":
        axes = setting.upper()
        if sorted(axes) != sorted(set(axes)) or not set(axes) <= set("TCYX") or not {"Y", "X"} <= set(axes):
            raise DataError(f"axes {setting!r} must use each of T, C, Y, X at most once and include Y and X")
    elif tiff_axes is not None:
        axes = "".join(a if a in "YX" else "C" if a in "CS" else "T" for a in tiff_axes.upper())
        if axes.count("T") > 1 or axes.count("C") > 1 or axes.count("Y") != 1 or axes.count("X") != 1:
            raise DataError(f"{path}: TIFF axes {tiff_axes!r} (shape {shape}) are ambiguous; give axes, e.g. 'TCYX'")
    elif len(shape) == 2:
        axes = "YX"
    elif len(shape) == 3:
        axes = "YXC" if shape[-1] <= 4 < shape[0] else "CYX"
    else:
        raise DataError(f"{path}: a {len(shape)}-D array (shape {shape}) needs explicit axes, e.g. 'TCYX'")
    if len(axes) != len(shape):
        raise DataError(f"{path}: axes {axes!r} do not fit an array of shape {shape}")
    return axes


def as_frames(array: np.ndarray, axes: str) -> np.ndarray:
    """T x C x H x W view of an array with the given axes (missing T or C become size 1)."""
    for letter in "TC":
        if letter not in axes:
            array, axes = array[None], letter + axes
    return array.transpose([axes.index(a) for a in "TCYX"])


def read_label(path: Path, frames: int, height: int, width: int, image_path: Path) -> np.ndarray:
    """The label file as T x H x W, checked against the image's frames and size."""
    array = load_array(path)
    if array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
        raise DataError(f"{path}: label holds non-integer values; labels must be class indices or instance ids")
    if array.dtype.kind not in "uifb":
        raise DataError(f"{path}: label dtype {array.dtype} is not an integer type")
    squeezed = np.squeeze(array, axis=tuple(i for i, n in enumerate(array.shape[:-2]) if n == 1))
    if squeezed.ndim == 3 and squeezed.shape[-1] == 1:
        squeezed = squeezed[..., 0]
    if squeezed.ndim == 2:
        squeezed = squeezed[None]
    if squeezed.ndim != 3 or squeezed.shape[1:] != (height, width) or squeezed.shape[0] != frames:
        raise DataError(f"{image_path} is {frames} frame(s) of {height}x{width} (H x W) but its label {path} "
                        f"is {'x'.join(map(str, array.shape))}; expected {'T x ' if frames > 1 else ''}H x W")
    return squeezed
