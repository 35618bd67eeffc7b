"""Datalists of a dataset folder, checked before any heavy work.

A dataset folder is ``DIR/cohort.csv`` (an ``image`` column, optional ``mask``, ``label`` and ``subject``
columns, paths relative to ``DIR``); or ``DIR/images/*.nii[.gz]`` with optional ``masks/`` and ``labels/``
of the same file names; or a flat folder of ``*.nii[.gz]``; or a BraTS-style folder (one folder per scan,
``<scan>_t1/_t1ce/_t2/_flair/_seg`` or ``<scan>-t1n/-t1c/-t2w/-t2f/-seg``): ``modality`` picks the image,
the segmentation is the label and the mask is the image's nonzero voxels (row key ``"foreground"``).
"""

from __future__ import annotations

import csv
import importlib
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from monai.data import Dataset
from scripts.engine.subjects import no_reference_error, subject_of, without_references
from scripts.errors import CS3FInputError, as_bool, as_choice, find_input_error, one_line
from scripts.scoring.references import ReferenceSet

__all__ = [
    "Datalist",
    "image_stem",
    "is_input_file",
    "make_datalist",
    "check_on_bad_input",
    "CheckedDataset",
    "ensure_demo",
    "ensure_lung_demo",
]

ON_BAD_INPUT = ("error", "skip")

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: ending of the map the bundle writes for each input (``SaveImaged`` ``output_postfix`` "anomaly")
MAP_SUFFIX = "_anomaly.nii.gz"


#: folders of an output folder (token cache, evaluation overlays): never scan folders of a BraTS layout
OUTPUT_FOLDERS = ("tokens", "overlays")


def is_input_file(path: Path) -> bool:
    """Whether a folder scan takes ``path`` as a volume: a NIfTI file, neither hidden (``.*``, macOS
    ``._*``) nor one of the bundle's maps (so an output folder may be the dataset folder)."""
    name = path.name
    return name.endswith(NIFTI_SUFFIXES) and not name.startswith(".") and not name.endswith(MAP_SUFFIX)


def check_on_bad_input(value: object) -> str:
    """``value`` if it is one of :data:`ON_BAD_INPUT`, else one :class:`CS3FInputError` line."""
    return as_choice(value, "on_bad_input", ON_BAD_INPUT)


def image_stem(path: str | Path) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (what output names are built from)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass(frozen=True)
class Datalist(Sequence):
    """The usable rows of a dataset folder (``{"image", "mask"?, "label"?, "name"}`` dicts, as MONAI datasets
    take), the volumes left out (``{"image", "reason"}``) and ``make_datalist``'s arguments for ``run.json``."""

    rows: list[dict[str, str]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    folder: str = ""
    masks: bool = True
    on_bad_input: str = "error"

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - as Sequence
        return self.rows[index]

    def __len__(self) -> int:
        return len(self.rows)


def _check_readable(path: Path, what: str) -> tuple:
    """Header check of a NIfTI file; returns its grid ``(shape, affine rounded to 1e-3 mm)``."""
    import nibabel as nib

    if not path.is_file():
        raise CS3FInputError(f"{what} file not found: {path}")
    try:
        image = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for a bad header
        raise CS3FInputError(f"cannot read {what} {path}: {one_line(err)}") from None
    shape = tuple(int(v) for v in image.header.get_data_shape())
    if len(shape) < 3 or (len(shape) > 3 and int(np.prod(shape[3:])) != 1):
        raise CS3FInputError(f"{what} {path} is not a single 3D volume (shape {shape})")
    if min(shape[:3]) < 2:
        raise CS3FInputError(f"{what} {path} has shape {shape[:3]}: CS3F slices every axis, each needs >= 2 voxels")
    affine = tuple(tuple(float(v) for v in row) for row in np.round(image.affine, 3))
    return shape[:3], affine


def make_datalist(
    dataset_dir: str | Path,
    masks: bool | str = True,
    labels: bool | str = False,
    min_volumes: int | None = None,
    on_bad_input: str = "error",
    require_same_grid: bool | str = True,
    subject_pattern: str | None = None,
    modality: str | None = None,
    references: object = "all",
) -> Datalist:
    """The :class:`Datalist` (rows ``{"image": path, "mask": path?, "label": path?, "name": stem}``) of a
    dataset folder.

    Args:
        dataset_dir: the dataset folder (see the module docstring for the layouts).
        masks: include foreground masks where the folder provides them.
        labels: include ground-truth labels where the folder provides them (evaluation).
        min_volumes: fewer usable volumes is an error; default 1 with a reference bank (``bank:DIR``), else 2.
        on_bad_input: ``"error"`` stops at the first unreadable file or off-grid volume; ``"skip"``
            leaves it out with a warning and lists it (``{"image", "reason"}``) in ``skipped``.
        require_same_grid: every image must have the shape and affine most of the cohort has (registered data).
        subject_pattern: a regular expression whose first group (or match) in the image name is the scan's
            subject (:func:`scripts.engine.subjects.subject_of`); rows then carry a ``"subject"``.
        modality: the image of a BraTS-style folder (``t1``, ``t1ce``, ``t2`` or ``flair``).
        references: the inferer's reference set: the default ``min_volumes``, and each volume needs a
            reference of another subject in it; ``None``: no scoring within the cohort (a bank build).

    Raises:
        CS3FInputError: one line naming the file (and the ``cohort.csv`` line) of any problem found.
    """
    on_bad_input = check_on_bad_input(on_bad_input)
    masks, labels = as_bool(masks, "use_masks"), as_bool(labels, "use_labels")
    require_same_grid = as_bool(require_same_grid, "require_same_grid")
    plan = None if references is None else ReferenceSet.parse(references)
    if min_volumes is None:
        min_volumes = 1 if plan is not None and plan.mode == "bank" else 2
    root = Path(dataset_dir)
    if not root.is_dir():
        raise CS3FInputError(f"dataset_dir does not exist or is not a folder: {root}")
    where: dict[str, str] = {}  # image path -> its cohort.csv line
    rows = _brats_rows(root, modality, masks, labels) if modality else _read_rows(root, masks, labels, where)
    if subject_pattern or any("subject" in r for r in rows):
        rows = [{**r, "subject": subject_of(r["name"], r, subject_pattern)} for r in rows]
    skipped: list[dict[str, str]] = []

    def bad(err: CS3FInputError, row: dict) -> None:
        """Raise ``err`` with the row's cohort.csv line, or (``skip``) warn and list the row as skipped."""
        err = CS3FInputError(f"{err}{_at(where, row['image'])}")
        if on_bad_input == "error":
            raise err
        warnings.warn(f"cs3f: skipping {row['image']}: {err}", stacklevel=4)
        skipped.append({"image": row["image"], "reason": str(err)})

    good, grids = _readable(rows, bad)
    if require_same_grid and good:
        good = _on_common_grid(good, grids, bad)
    if len(good) < min_volumes:
        raise CS3FInputError(
            f"CS3F compares volumes with each other: found {len(good)} usable volume(s) in {root}, "
            f"need >= {min_volumes}"
        )
    lonely = [] if plan is None else without_references([r.get("subject", r["name"]) for r in good], plan)
    if lonely:
        how = f"subject_pattern {subject_pattern!r}" if subject_pattern else "the subject column of cohort.csv"
        raise no_reference_error([good[i]["image"] for i in lonely], plan, how)
    return Datalist(good, skipped, str(dataset_dir), masks, on_bad_input)


def _read_rows(root: Path, masks: bool, labels: bool, where: dict[str, str]) -> list[dict[str, str]]:
    """The named rows of ``root``'s cohort.csv (their lines noted in ``where``) or folders, checked for
    consistency (not yet read)."""
    rows: list[dict[str, str]] = []
    table = root / "cohort.csv"
    if table.is_file():
        rows = _csv_rows(table, masks, labels, where)
    else:
        image_dir = root / "images" if (root / "images").is_dir() else root
        for image in sorted(p for p in image_dir.iterdir() if p.is_file() and is_input_file(p)):
            row = {"image": str(image)}
            for key, folder, wanted in (("mask", "masks", masks), ("label", "labels", labels)):
                candidate = root / folder / image.name
                if wanted and candidate.is_file():
                    row[key] = str(candidate)
            rows.append(row)
    if not rows:
        raise CS3FInputError(f"no NIfTI volumes (*.nii, *.nii.gz) found in {root} (nor a cohort.csv)")
    for key in ("mask", "label"):
        have = [key in r for r in rows]
        if any(have) and not all(have):
            missing = next(r["image"] for r in rows if key not in r)
            raise CS3FInputError(
                f"some volumes have a {key} and others do not, e.g. no {key} for {missing}{_at(where, missing)}"
            )
    names = [image_stem(r["image"]) for r in rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        lines = "".join(_at(where, i) for i in dict.fromkeys(r["image"] for r in rows) if image_stem(i) in duplicates)
        raise CS3FInputError(f"image names must be unique (outputs are named after them): {duplicates}{lines}")
    return [{**row, "name": name} for row, name in zip(rows, names, strict=True)]


def _at(where: dict[str, str], image: str) -> str:
    """`` (<cohort.csv> line N)`` for an image listed in a cohort.csv, else ``""``."""
    return f" ({where[image]})" if image in where else ""


def _csv_rows(table: Path, masks: bool, labels: bool, where: dict[str, str]) -> list[dict[str, str]]:
    """The rows of a cohort.csv (UTF-8, with or without the byte-order mark Excel writes); the file line of
    each row goes to ``where`` (line 1 is the header)."""
    rows: list[dict[str, str]] = []
    lines: dict[str, list[str]] = {}
    reader = None
    try:
        with table.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [str(c).strip() for c in reader.fieldnames or []]
            if "image" not in reader.fieldnames:
                raise CS3FInputError(f"no 'image' column (columns: {reader.fieldnames}) ({table} line 1)")
            for rec in reader:
                cells = {k: str(v or "").strip() for k, v in rec.items() if k is not None}
                if not cells["image"]:
                    raise CS3FInputError(f"empty 'image' cell ({table} line {reader.line_num})")
                row = {"image": str(table.parent / cells["image"])}
                for key, wanted in (("mask", masks), ("label", labels)):
                    if wanted and cells.get(key):
                        row[key] = str(table.parent / cells[key])
                if cells.get("subject"):
                    row["subject"] = cells["subject"]
                lines.setdefault(row["image"], []).append(str(reader.line_num))
                rows.append(row)
    except UnicodeDecodeError as err:
        raise CS3FInputError(f"not UTF-8 text: {err.reason} at byte {err.start} ({table})") from None
    except csv.Error as err:
        raise CS3FInputError(f"not a CSV table: {err} ({table} line {reader.line_num if reader else 1})") from None
    where.update({image: f"{table} line{'s' * (len(n) > 1)} {', '.join(n)}" for image, n in lines.items()})
    return rows


# Modality -> file suffixes in BraTS 2021 and BraTS 2023+ (METS, GLI) naming.
BRATS_FILES = {
    "t1": ("_t1", "-t1n"),
    "t1ce": ("_t1ce", "-t1c"),
    "t2": ("_t2", "-t2w"),
    "flair": ("_flair", "-t2f"),
    "seg": ("_seg", "-seg"),
}


def _brats_file(folder: Path, kind: str) -> Path | None:
    for suffix in BRATS_FILES[kind]:
        for ext in NIFTI_SUFFIXES:
            path = folder / f"{folder.name}{suffix}{ext}"
            if path.is_file():
                return path
    return None


def _brats_rows(root: Path, modality: str, masks: bool, labels: bool) -> list[dict[str, str]]:
    """Rows of a BraTS-style folder: the ``modality`` image of each scan folder, its segmentation as the
    label, its nonzero voxels as the mask."""
    if modality not in BRATS_FILES or modality == "seg":
        raise CS3FInputError(f"modality must be one of t1, t1ce, t2, flair, got {modality!r}")
    rows = []
    for folder in sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in OUTPUT_FOLDERS
    ):
        image = _brats_file(folder, modality)
        if image is None:
            raise CS3FInputError(
                f"{folder} has no {modality} image ({folder.name}{BRATS_FILES[modality][0]}.nii.gz or "
                f"{folder.name}{BRATS_FILES[modality][1]}.nii.gz): not a BraTS-style scan folder"
            )
        row = {"image": str(image), "name": image_stem(image)}
        seg = _brats_file(folder, "seg")
        if labels and seg is not None:
            row["label"] = str(seg)
        if masks:
            row["foreground"] = "image"
        rows.append(row)
    if not rows:
        raise CS3FInputError(f"no scan folders in {root}: a BraTS-style dataset has one folder per scan")
    if labels and any("label" in r for r in rows) and not all("label" in r for r in rows):
        missing = next(r["image"] for r in rows if "label" not in r)
        raise CS3FInputError(f"some scans have a segmentation and others do not, e.g. none for {missing}")
    return rows


def _readable(rows: list[dict[str, str]], bad: Callable) -> tuple[list[dict[str, str]], dict[str, tuple]]:
    """The rows whose files are readable 3D volumes with masks/labels of their image's shape, and the
    image grid of each (see :func:`_check_readable`)."""
    good: list[dict[str, str]] = []
    grids: dict[str, tuple] = {}
    for row in rows:
        name = row["name"]
        try:
            for key in ("image", "mask", "label"):
                if key in row:
                    grid = _check_readable(Path(row[key]), key)
                    if key == "image":
                        grids[name] = grid
                    elif grid[0] != grids[name][0]:
                        raise CS3FInputError(
                            f"{key} {row[key]} has shape {grid[0]} but its image {row['image']} has {grids[name][0]}"
                        )
                    elif not np.allclose(grid[1], grids[name][1], atol=1e-3):
                        # Same shape, other affine (e.g. an LPS header): applied voxel by voxel it would
                        # put the mask mirrored or shifted over the image.
                        raise CS3FInputError(
                            f"{key} {row[key]} has another affine than its image {row['image']} (rows "
                            f"{[list(a) for a in grid[1][:3]]} vs {[list(a) for a in grids[name][1][:3]]})"
                        )
            good.append(row)
        except CS3FInputError as err:
            bad(err, row)
    return good, grids


def _on_common_grid(rows: list[dict[str, str]], grids: dict[str, tuple], bad: Callable) -> list[dict[str, str]]:
    """The rows whose image has the grid (shape and affine) that most of the cohort has."""
    reference, count = Counter(grids[r["name"]] for r in rows).most_common(1)[0]
    kept = []
    for row in rows:
        if grids[row["name"]] == reference:
            kept.append(row)
            continue
        shape, affine = grids[row["name"]]
        err = CS3FInputError(
            f"{row['image']} is not on the cohort's grid (shape {shape}, affine rows "
            f"{[list(a) for a in affine[:3]]}; {count} of {len(rows)} volumes have shape {reference[0]}, "
            f"affine rows {[list(a) for a in reference[1][:3]]}): register all volumes to one space, "
            f"or set require_same_grid false if the preprocessing resamples them"
        )
        bad(err, row)
    return kept


class CheckedDataset(Dataset):
    """MONAI ``Dataset`` that turns a failing item into one :class:`CS3FInputError` line naming the file or,
    with ``on_bad_input="skip"`` (default: the :class:`Datalist`'s), into ``{"bad_input": reason, "name": stem}``.
    """

    def __init__(self, data, transform=None, on_bad_input: str | None = None) -> None:  # noqa: ANN001
        super().__init__(data, transform)
        on_bad_input = getattr(data, "on_bad_input", "error") if on_bad_input is None else on_bad_input
        self.on_bad_input = check_on_bad_input(on_bad_input)

    def _transform(self, index: int):  # noqa: ANN202 - as Dataset._transform
        try:
            return super()._transform(index)
        except Exception as err:
            row = self.data[index]
            found = find_input_error(err) or CS3FInputError(f"cannot preprocess {row['image']}: {one_line(err)}")
            if self.on_bad_input == "skip":
                return {"bad_input": str(found), "name": row.get("name", image_stem(row["image"]))}
            raise found from None


def _ensure(dataset_dir: str | Path, demo_dir: str | Path, generator: str, what: str, synth_kwargs: dict) -> Path:
    """Generate ``scripts.synthetic.<generator>``'s cohort into ``demo_dir`` when ``dataset_dir`` is that
    absent folder (the only import of ``scripts.synthetic``); returns ``dataset_dir``."""
    dataset_dir, demo_dir = Path(dataset_dir), Path(demo_dir)
    # any other missing dataset_dir is make_datalist's error, never replaced by demo data
    if dataset_dir.resolve() == demo_dir.resolve() and not (demo_dir / "cohort.csv").is_file():
        module = importlib.import_module(f"scripts.synthetic.{generator}")
        print(f"cs3f: {what} cohort not found, generating it in {demo_dir} ...", flush=True)
        module.ensure_cohort(demo_dir, **synth_kwargs)
    return dataset_dir


def ensure_demo(
    dataset_dir: str | Path,
    demo_dir: str | Path,
    n_normal: int = 20,
    n_abnormal: int = 12,
    shape: int = 96,
    contrast: str = "t1",
    seed: int = 0,
    **synth_kwargs,
) -> Path:
    """The brain demo cohort in ``demo_dir`` if ``dataset_dir`` is that folder and it is absent: 20
    normal and 12 abnormal T1 volumes of 96^3 (:func:`scripts.synthetic.brain.generate_cohort` arguments;
    more in ``synth_kwargs``)."""
    recipe = {"n_normal": n_normal, "n_abnormal": n_abnormal, "shape": shape, "contrast": contrast, "seed": seed}
    return _ensure(dataset_dir, demo_dir, "brain", "demo", {**recipe, **synth_kwargs})


def ensure_lung_demo(dataset_dir: str | Path, demo_dir: str | Path, **synth_kwargs) -> Path:
    """The chest-CT demo cohort (:func:`scripts.synthetic.lung.generate_cohort` arguments in
    ``synth_kwargs``) in ``demo_dir`` if ``dataset_dir`` is that folder and it is absent."""
    return _ensure(dataset_dir, demo_dir, "lung", "lung demo", synth_kwargs)
