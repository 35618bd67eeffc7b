"""Datalists, checked loading and one-line input errors for the bundle.

A dataset folder is either

* ``DIR/cohort.csv`` (what ``python -m scripts synth`` writes) with at least an ``image`` column and
  optionally ``mask`` and ``label`` columns, paths relative to ``DIR``; or
* ``DIR/images/*.nii[.gz]`` with optional ``DIR/masks/`` and ``DIR/labels/`` holding files of the
  same names; or
* a flat folder of ``*.nii[.gz]`` volumes.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from monai.transforms import LoadImaged

__all__ = [
    "CS3FInputError",
    "install_excepthook",
    "make_datalist",
    "CheckedLoadImaged",
    "image_stem",
    "ensure_demo",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class CS3FInputError(ValueError):
    """Bad user input (files, folders, parameters): shown as one line by the bundle command."""


def find_input_error(exc: BaseException | None) -> CS3FInputError | None:
    """The :class:`CS3FInputError` behind ``exc``, if any.

    Looks through the ``__cause__``/``__context__`` chain (MONAI's config parser and ``Compose`` wrap
    exceptions) and through the text of exceptions re-raised by ``DataLoader`` worker processes,
    which carry only the original traceback as a string.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CS3FInputError):
            return exc
        marker = f"{CS3FInputError.__module__}.{CS3FInputError.__name__}: "
        for line in str(exc).splitlines():
            if line.startswith(marker):
                return CS3FInputError(line[len(marker) :])
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def install_excepthook() -> None:
    """Make an uncaught :class:`CS3FInputError` print one ``cs3f: error: ...`` line and exit 1.

    MONAI's config parser wraps exceptions raised while evaluating expressions; the hook looks through
    the chain so that the user sees the cause, not a parser traceback. Other errors keep their
    traceback.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # noqa: ANN001 - signature fixed by sys.excepthook
        found = find_input_error(exc)
        if found is not None:
            # Start a fresh line: a progress bar may have left the cursor mid-line.
            print(f"\ncs3f: error: {found}", file=sys.stderr)
            sys.exit(1)
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def image_stem(path: str | Path) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (what output names are built from)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _niftis(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))


def _check_readable(path: Path, what: str) -> None:
    import nibabel as nib

    if not path.is_file():
        raise CS3FInputError(f"{what} file not found: {path}")
    try:
        header = nib.load(str(path)).header
    except Exception as err:  # nibabel raises several types for a bad header
        raise CS3FInputError(f"cannot read {what} {path}: {err}") from None
    if len(header.get_data_shape()) < 3:
        raise CS3FInputError(f"{what} {path} is not a 3D volume (shape {header.get_data_shape()})")


def make_datalist(
    dataset_dir: str | Path,
    masks: bool = True,
    labels: bool = False,
    min_volumes: int = 2,
) -> list[dict[str, str]]:
    """Datalist ``[{"image": path, "mask": path?, "label": path?, "name": stem}, ...]`` of a dataset folder.

    Args:
        dataset_dir: the dataset folder (see the module docstring for the layouts).
        masks: include foreground masks where the folder provides them.
        labels: include ground-truth labels where the folder provides them (evaluation).
        min_volumes: CS3F scores volumes against each other, so fewer than this is an error.

    Raises:
        CS3FInputError: missing or empty folder, missing or unreadable files, duplicate names, too few
            volumes, a mask column with some entries missing.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise CS3FInputError(f"dataset_dir does not exist or is not a folder: {root}")
    rows: list[dict[str, str]] = []
    table = root / "cohort.csv"
    if table.is_file():
        with table.open(newline="") as f:
            reader = csv.DictReader(f)
            if "image" not in (reader.fieldnames or []):
                raise CS3FInputError(f"{table} has no 'image' column (columns: {reader.fieldnames})")
            for rec in reader:
                row = {"image": str(root / rec["image"])}
                for key, wanted in (("mask", masks), ("label", labels)):
                    if wanted and rec.get(key):
                        row[key] = str(root / rec[key])
                rows.append(row)
    else:
        image_dir = root / "images" if (root / "images").is_dir() else root
        for image in _niftis(image_dir):
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
            raise CS3FInputError(f"some volumes have a {key} and others do not, e.g. no {key} for {missing}")
    names = [image_stem(r["image"]) for r in rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CS3FInputError(f"image names must be unique (outputs are named after them): {duplicates}")
    if len(rows) < min_volumes:
        raise CS3FInputError(
            f"CS3F compares volumes with each other: found {len(rows)} volume(s) in {root}, "
            f"need >= {min_volumes}"
        )
    for row, name in zip(rows, names, strict=True):
        for key in ("image", "mask", "label"):
            if key in row:
                _check_readable(Path(row[key]), key)
        row["name"] = name
    return rows


class CheckedLoadImaged(LoadImaged):
    """``LoadImaged`` whose read errors name the failing file in one :class:`CS3FInputError` line."""

    def __call__(self, data, reader=None):  # noqa: ANN001 - same signature as LoadImaged
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d.update(super().__call__({key: d[key]}, reader))
            except Exception as err:
                cause = err
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                raise CS3FInputError(f"cannot read {key} {d[key]}: {_one_line(cause)}") from None
        return d


def ensure_demo(dataset_dir: str | Path, demo_dir: str | Path, **synth_kwargs) -> Path:
    """Generate the demo cohort into ``demo_dir`` when ``dataset_dir`` is the demo folder and absent.

    A user-given ``dataset_dir`` that does not exist is never replaced by demo data: that is an error
    raised later by :func:`make_datalist`.
    """
    dataset_dir, demo_dir = Path(dataset_dir), Path(demo_dir)
    if dataset_dir.resolve() == demo_dir.resolve() and not (demo_dir / "cohort.csv").is_file():
        from scripts.synth import generate_cohort

        print(f"cs3f: demo cohort not found, generating it in {demo_dir} ...", flush=True)
        generate_cohort(demo_dir, **synth_kwargs)
    return dataset_dir
