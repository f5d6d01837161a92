"""Reading BUSI-layout folders and writing files whole or not at all.

This is the one place where a user's files are checked. The dataset builder,
``evaluate --data_dir`` and ``predict`` all read through it, so every problem
with a folder (corrupt PNG, orphan mask, size mismatch, odd pixel modes, empty
class folder) is raised here, once, with one wording: a :class:`BusiDataError`
whose message starts with the offending path.

Folder layout (the public BUSI release's)::

        ROOT/
            benign/     <stem>.png, <stem>_mask.png, optionally <stem>_mask_1.png, ...
            malignant/  ...
            normal/     <stem>.png, <stem>_mask.png (all-zero)

Any class folder may be absent; any stem works (numbers are never parsed out of
names). Every ``<stem>_mask*.png`` beside a scan is merged into its mask by
logical OR.

Decisions a user may need to know:
    * A benign or malignant scan with no mask file is an error: its lesion would
        be silently labelled as background. A normal scan with no mask file is
        accepted with an empty mask (a normal scan has no lesion by definition).
    * Hidden files (``.DS_Store``, ``._*``) and ``Thumbs.db`` are ignored; any
        other file that is not a PNG/JPEG scan or mask is an error, not a skip.
    * Scans become 8-bit grayscale (ITU-R 601 luma for colour, alpha dropped,
        16-bit scaled by 255/65535); masks become boolean (>= half of full range).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import tempfile
import zipfile
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

CLASS_NAMES = ("normal", "benign", "malignant")
"""Class folder names, in the order of the dataset's integer labels."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RELEASE_FOLDER = "Dataset_BUSI_with_GT"

# `<stem>_mask.png`, `<stem>_mask_1.png`, `<stem>_mask_lesion2.png`: the mask
# suffix is matched as a pattern; the stem itself is never interpreted.
_MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_[^/]*)?$")
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}


class BusiDataError(ValueError):
    """A problem with a user's data: the message names the file and the fault."""


@dataclasses.dataclass(frozen=True)
class ScanRecord:
    """One scan and the mask files that belong to it.

    Attributes:
        file_name: ``'<class>/<stem>.<ext>'``, unique within a dataset folder.
        label: class folder name (one of :data:`CLASS_NAMES`), or None when the
            scan was given without a class (``predict`` on a loose file).
        image_path: path of the scan.
        mask_paths: paths of its mask files, sorted; empty for a normal scan
            without a mask file and for unlabelled inputs.
    """

    file_name: str
    label: str | None
    image_path: pathlib.Path
    mask_paths: tuple[pathlib.Path, ...]


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_FILES


def find_dataset_root(path: str | os.PathLike[str]) -> pathlib.Path:
    """Finds the folder holding the class folders.

    Accepts the class folders' parent itself, or a folder holding the release's
    ``Dataset_BUSI_with_GT/`` (the TFDS ``manual_dir``).

    Args:
        path: a folder.

    Returns:
        The folder whose children are ``benign/``, ``malignant/``, ``normal/``.

    Raises:
        BusiDataError: the folder is missing or holds no class folder.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise BusiDataError(f"{path}: folder does not exist")
    if not path.is_dir():
        raise BusiDataError(f"{path}: not a folder")
    for candidate in (path, path / RELEASE_FOLDER):
        if any((candidate / c).is_dir() for c in CLASS_NAMES):
            return candidate
    raise BusiDataError(
        f"{path}: no class folder ({', '.join(CLASS_NAMES)}) found here or in"
        f" {path / RELEASE_FOLDER}"
    )


def extract_release_zip(zip_path: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """Extracts the release's .zip into ``out_dir`` (whole or not at all)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise BusiDataError(f"{zip_path}: corrupt member {bad}")
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = pathlib.Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".extract-"))
            try:
                zf.extractall(tmp)
                os.replace(tmp, out_dir)
            except BaseException:
                _rmtree(tmp)
                raise
    except zipfile.BadZipFile as e:
        raise BusiDataError(f"{zip_path}: not a readable zip file ({e})") from None
    return out_dir


def _rmtree(path: pathlib.Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def list_scans(root: str | os.PathLike[str]) -> list[ScanRecord]:
    """Pairs every scan in a BUSI-layout folder with its mask files.

    Args:
        root: a folder accepted by :func:`find_dataset_root`.

    Returns:
        Records sorted by ``file_name``, so the order never depends on the file
        system.

    Raises:
        BusiDataError: an empty class folder, a mask with no scan, a lesion scan
            with no mask, two scans with one stem, or a file that is neither.
    """
    root = find_dataset_root(root)
    records = []
    for label in CLASS_NAMES:
        folder = root / label
        if not folder.is_dir():
            continue
        records.extend(_list_class_folder(folder, label))
    return sorted(records, key=lambda r: r.file_name)


def _list_class_folder(folder: pathlib.Path, label: str) -> list[ScanRecord]:
    scans: dict[str, pathlib.Path] = {}
    masks: dict[str, list[pathlib.Path]] = {}
    for path in sorted(folder.iterdir()):
        if _is_ignored(path.name):
            continue
        if path.is_dir():
            raise BusiDataError(f"{path}: unexpected sub-folder inside a class folder")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise BusiDataError(
                f"{path}: unexpected file (expected <stem>.png scans and <stem>_mask*.png masks)"
            )
        m = _MASK_RE.match(path.stem)
        if m:
            masks.setdefault(m.group("stem"), []).append(path)
        else:
            if path.stem in scans:
                raise BusiDataError(
                    f"{path}: two scans share the stem {path.stem!r} ({scans[path.stem].name})"
                )
            scans[path.stem] = path
    if not scans:
        raise BusiDataError(f"{folder}: class folder holds no scans")
    for stem, paths in masks.items():
        if stem not in scans:
            raise BusiDataError(f"{paths[0]}: mask with no scan (expected {folder / stem}.png)")
    records = []
    for stem, image_path in scans.items():
        mask_paths = tuple(sorted(masks.get(stem, ())))
        if not mask_paths and label != "normal":
            raise BusiDataError(
                f"{image_path}: {label} scan with no mask file (expected {stem}_mask.png)"
            )
        records.append(
            ScanRecord(
                file_name=f"{label}/{image_path.name}",
                label=label,
                image_path=image_path,
                mask_paths=mask_paths,
            )
        )
    return records


def list_inputs(path: str | os.PathLike[str]) -> list[ScanRecord]:
    """Lists scans to run inference on: a file, a BUSI-layout folder, or a flat folder.

    In a flat folder every image that is not a ``*_mask*`` file is a scan; masks
    beside it are attached (so predict can also report Dice when they exist).

    Raises:
        BusiDataError: nothing to read.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise BusiDataError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise BusiDataError(f"{path}: not a PNG or JPEG file")
        return [ScanRecord(path.name, None, path, ())]
    if any((path / c).is_dir() for c in CLASS_NAMES) or (path / RELEASE_FOLDER).is_dir():
        return list_scans(path)
    scans, masks = {}, {}
    for p in sorted(path.iterdir()):
        if _is_ignored(p.name) or p.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        m = _MASK_RE.match(p.stem)
        if m:
            masks.setdefault(m.group("stem"), []).append(p)
        else:
            scans[p.stem] = p
    if not scans:
        raise BusiDataError(f"{path}: folder holds no PNG or JPEG scans")
    return [
        ScanRecord(p.name, None, p, tuple(sorted(masks.get(stem, ())))) for stem, p in scans.items()
    ]


def _open(path: pathlib.Path) -> Image.Image:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BusiDataError(f"{path}: cannot read ({e.strerror})") from None
    if size == 0:
        raise BusiDataError(f"{path}: empty file (0 bytes)")
    try:
        img = Image.open(path)
        img.load()  # Decodes now, so truncated data fails here and not later.
    except Exception as e:  # PIL raises several unrelated types for bad files.
        raise BusiDataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return img


def _to_uint8_gray(img: Image.Image, path: pathlib.Path) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit PNGs span 0..65535; scaling by the type's range (not the image's
        # max) keeps the intensities comparable across scans.
        return np.clip(np.round(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    if mode == "F":
        raise BusiDataError(f"{path}: floating-point images are not supported")
    if mode == "1":
        return np.asarray(img, dtype=np.uint8) * np.uint8(255)
    if mode in ("L",):
        return np.asarray(img, dtype=np.uint8)
    if mode in ("LA", "La"):
        return np.asarray(img.getchannel("L"), dtype=np.uint8)
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa", "RGBX"):
        img = img.convert("RGB")
    elif mode not in ("RGB",):
        try:
            img = img.convert("RGB")
        except Exception as e:
            raise BusiDataError(f"{path}: unsupported pixel mode {mode!r} ({e})") from None
    return np.asarray(img.convert("L"), dtype=np.uint8)


def read_scan(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads a scan as 8-bit grayscale.

    Args:
        path: a PNG or JPEG in any of the modes L, LA, P, RGB, RGBA, 1, I;16, I.

    Returns:
        ``[H, W]`` uint8.

    Raises:
        BusiDataError: empty, corrupt, truncated or unsupported file.
    """
    path = pathlib.Path(path)
    return _to_uint8_gray(_open(path), path)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads a mask file as a boolean array (``>= 128`` on the 8-bit scale).

    Returns:
        ``[H, W]`` bool.
    """
    return read_scan(path) >= 128


def read_example(record: ScanRecord) -> tuple[np.ndarray, np.ndarray]:
    """Reads a scan and merges its mask files.

    Returns:
        ``(image [H, W] uint8, mask [H, W] bool)``; the mask is all False for a
        record without mask files.

    Raises:
        BusiDataError: unreadable files or a mask whose size differs from the scan.
    """
    image = read_scan(record.image_path)
    mask = np.zeros(image.shape, dtype=bool)
    for mask_path in record.mask_paths:
        m = read_mask(mask_path)
        if m.shape != image.shape:
            raise BusiDataError(
                f"{mask_path}: mask size {m.shape[1]}x{m.shape[0]} does not match its scan"
                f" {record.image_path.name} ({image.shape[1]}x{image.shape[0]})"
            )
        mask |= m
    return image, mask


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resizes an 8-bit scan with antialiasing (Pillow's bilinear filter).

    Args:
        image: ``[H, W]`` uint8.
        size: output side, or ``(height, width)``.

    Returns:
        ``[h, w]`` uint8.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resizes a boolean mask by area-weighted resampling and a 0.5 threshold.

    Nearest-neighbour resampling would drop thin lesion parts at random; the
    threshold keeps each output pixel that is at least half lesion.

    Args:
        mask: ``[H, W]`` bool.
        size: output side, or ``(height, width)``.

    Returns:
        ``[h, w]`` bool.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if mask.shape == (h, w):
        return mask.astype(bool)
    m = Image.fromarray(mask.astype(np.float32))
    return np.asarray(m.resize((w, h), Image.Resampling.BILINEAR)) >= 0.5


# --- Writing whole or not at all -------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
    """Yields a temporary path beside ``path``; renames it into place on success.

    On any exception (including a full disk) the temporary file is removed and
    ``path`` keeps its previous content, if any.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp makes the file private (0600); outputs get the usual mode.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes bytes to ``path`` whole or not at all."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes UTF-8 text to ``path`` whole or not at all."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj) -> None:
    """Writes JSON (indented, keys in insertion order) whole or not at all."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_write_png(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Writes a ``[H, W]`` or ``[H, W, 3|4]`` uint8 (or bool) array as a PNG."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * np.uint8(255)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def read_examples(
    records: Sequence[ScanRecord],
) -> Iterator[tuple[ScanRecord, np.ndarray, np.ndarray]]:
    """Yields ``(record, image, mask)`` for each record, in order."""
    for r in records:
        image, mask = read_example(r)
        yield r, image, mask
