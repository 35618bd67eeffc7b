"""What the brain and lung cohort generators share: random fields, region growing, NIfTI files and the
atomic cohort writer.

A cohort is a folder ``images/ labels/ masks/ cohort.csv``; :func:`write_cohort` makes it appear whole
or not at all, :func:`ensure_cohort` reuses a finished one. Lesion size classes are the evaluation's
(:func:`scripts.evaluation.lesions.size_class`), re-exported here so that the generators and the
metrics can never disagree about them.
"""

from __future__ import annotations

import contextlib
import csv
import heapq
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scripts.evaluation.lesions import SIZE_CLASSES, size_class

__all__ = [
    "SIZE_CLASSES",
    "check_counts",
    "cohort_counts",
    "ensure_cohort",
    "grow_region",
    "largest_component",
    "largest_lesion_centre",
    "preview_rows",
    "read_cohort",
    "report_subject",
    "save_figure",
    "save_nifti",
    "shuffled_abnormal",
    "single_thread",
    "size_class",
    "smooth_field",
    "smooth_noise",
    "subject_row",
    "write_cohort",
    "write_subject_files",
]

#: the sub-folders of a cohort, one NIfTI file per subject in each
COHORT_FOLDERS = ("images", "labels", "masks")
_NEIGH6 = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


# ----------------------------------------------------------------------------------------------
# random fields and regions
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread inside (also usable as a decorator, ``@single_thread()``).

    The tensors of a subject are small: one thread is faster than two fighting over a busy CPU.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise (float32) scaled to unit standard deviation: tissue texture."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return n / (n.std() + 1e-8)


def smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: int) -> np.ndarray:
    """Smooth random field in [-1, 1]: a ``cells``^3 Gaussian grid interpolated trilinearly to ``shape``."""
    coarse = torch.from_numpy(rng.standard_normal((1, 1, cells, cells, cells)).astype(np.float32))
    f = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()
    return f / (np.abs(f).max() + 1e-8)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean mask (the mask itself if it has at most one)."""
    lab, n = ndimage.label(mask)
    return mask if n <= 1 else lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))


def grow_region(field_: np.ndarray, allowed: np.ndarray, seed: Sequence[int], n: int) -> np.ndarray:
    """Priority flood from ``seed`` through 6-neighbours of ``allowed``, highest ``field_`` first.

    Grows until ``n`` voxels (or no allowed neighbour is left): a connected, irregular region with
    exactly the requested voxel count whenever there is room, which is how lesions get exact volumes.

    Returns:
        The flat indices (into ``allowed.shape``) of the region, in growth order; empty when the seed
        itself is not allowed.
    """
    padded = np.pad(allowed, 1, constant_values=False)
    f = np.pad(field_, 1, constant_values=-np.inf).ravel()
    ok = padded.ravel().copy()
    strides = np.array(padded.strides) // padded.itemsize
    offsets = (_NEIGH6 * strides).sum(1).tolist()
    s = int(np.ravel_multi_index(tuple(np.asarray(seed) + 1), padded.shape))
    if not ok[s]:
        return np.zeros(0, dtype=np.int64)
    ok[s] = False
    heap = [(-f[s], s)]
    order = []
    while heap and len(order) < n:
        _, p = heapq.heappop(heap)
        order.append(p)
        for o in offsets:
            q = p + o
            if ok[q]:
                ok[q] = False
                heapq.heappush(heap, (-f[q], q))
    idx = np.unravel_index(np.asarray(order, dtype=np.int64), padded.shape)
    return np.ravel_multi_index(tuple(i - 1 for i in idx), allowed.shape)


# ----------------------------------------------------------------------------------------------
# subjects and their files
# ----------------------------------------------------------------------------------------------


def check_counts(n_normal: int, n_abnormal: int) -> None:
    """Raise ``ValueError`` unless the counts make a cohort of at least one subject."""
    if n_normal < 0 or n_abnormal < 0 or n_normal + n_abnormal < 1:
        raise ValueError("need n_normal >= 0, n_abnormal >= 0 and at least one subject")


def shuffled_abnormal(n_normal: int, n_abnormal: int, seed: int, stream: int) -> np.ndarray:
    """Which subject indices are abnormal: shuffled, so that the order of a cohort carries no signal.

    ``stream`` keeps the draw independent of every subject's own streams (``[seed, index]``).
    """
    n = n_normal + n_abnormal
    abnormal = np.zeros(n, bool)
    abnormal[np.random.default_rng([seed, stream]).permutation(n)[:n_abnormal]] = True
    return abnormal


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, xform_code: int) -> None:
    """Write ``array`` with ``affine`` as both qform and sform (``xform_code``: 1 = scanner, 4 = MNI)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=xform_code)
    img.set_sform(affine, code=xform_code)
    nib.save(img, str(path))


def write_subject_files(
    folder: Path,
    index: int,
    affine: np.ndarray,
    image: np.ndarray,
    label: np.ndarray,
    mask: np.ndarray,
    xform_code: int,
) -> str:
    """Write subject ``index``'s image, label and mask into a cohort ``folder``; returns the file name."""
    name = f"sub-{index + 1:04d}.nii.gz"
    for sub, array in zip(COHORT_FOLDERS, (image, label, mask), strict=True):
        save_nifti(array, affine, folder / sub / name, xform_code)
    return name


def subject_row(name: str, abnormal: bool, lesion_volumes_mm3: Sequence[float], **extra) -> dict:
    """The ``cohort.csv`` row of a subject: relative paths, abnormality, lesion volumes, then ``extra``."""
    return {
        "image": f"images/{name}",
        "label": f"labels/{name}",
        "mask": f"masks/{name}",
        "abnormal": int(abnormal),
        "n_lesions": len(lesion_volumes_mm3),
        "lesion_volumes_mm3": ";".join(f"{v:.1f}" for v in lesion_volumes_mm3),
        **extra,
    }


def report_subject(row: dict, detail: str) -> None:
    """Print the progress line of a written subject; ``detail`` is what the organ adds."""
    kind = "abnormal" if row["abnormal"] else "normal  "
    print(
        f"  {Path(row['image']).name}  {kind}  {detail}  lesions (mm3): {row['lesion_volumes_mm3'] or '-'}", flush=True
    )


# ----------------------------------------------------------------------------------------------
# cohorts
# ----------------------------------------------------------------------------------------------


def _write_rows(folder: Path, rows: list[dict]) -> None:
    with open(folder / "cohort.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():  # overwrite: swap, then delete the old cohort
        trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(trash)
        tmp.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        tmp.rename(out_dir)
    except OSError as err:  # another process finished the same cohort first
        raise FileExistsError(f"{out_dir} appeared while this cohort was being generated") from err


def write_cohort(
    out_dir: str | Path,
    make_jobs: Callable[[Path], list],
    write_subject: Callable[[object], dict],
    describe: Callable[[dict], str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    verbose: bool = False,
) -> Path:
    """Write a cohort so that it appears whole or not at all.

    Args:
        out_dir: the cohort folder. An existing non-empty one is an error unless ``overwrite``.
        make_jobs: ``tmp -> jobs``, one job per subject, given the temporary folder to write into.
        write_subject: ``job -> cohort.csv row``; writes the subject's files (a module-level function:
            with ``workers > 1`` it runs in spawned processes).
        describe: ``row -> text`` for the progress line of each subject (with ``verbose``).
        workers: processes generating subjects (every subject has its own random stream, so the
            cohort is the same for any number).
        overwrite: replace an existing cohort (only once the new one is complete).
        verbose: print one line per subject.

    Subjects are written into a temporary sibling folder, the rows form ``cohort.csv``, then the folder
    is renamed into place: an interrupted run never leaves a complete-looking half cohort.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty, and not ``overwrite``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for sub in COHORT_FOLDERS:
            (tmp / sub).mkdir(parents=True)

        def reported(row: dict) -> dict:
            if verbose:
                report_subject(row, describe(row) if describe else "")
            return row

        rows = _run_jobs(write_subject, make_jobs(tmp), workers, reported)
        _write_rows(tmp, rows)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _run_jobs(
    write_subject: Callable[[object], dict], jobs: list, workers: int, on_row: Callable[[dict], dict]
) -> list[dict]:
    """``on_row(write_subject(job))`` for every job, in order, in ``workers`` processes if > 1."""
    if workers <= 1:
        return [on_row(write_subject(job)) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix well
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return [on_row(row) for row in pool.map(write_subject, jobs)]


def ensure_cohort(out_dir: str | Path, generate: Callable[..., Path], **kwargs) -> Path:
    """``out_dir`` if it already holds a cohort, else ``generate(out_dir, **kwargs)``.

    Cohorts appear atomically, so ``cohort.csv`` means finished; a cohort that another process
    finishes first is taken as it is. This is what a demo calls on first run.
    """
    out_dir = Path(out_dir)
    if (out_dir / "cohort.csv").is_file():
        return out_dir
    try:
        return generate(out_dir, **kwargs)
    except FileExistsError:
        if (out_dir / "cohort.csv").is_file():  # generated concurrently by another process
            return out_dir
        raise


def read_cohort(cohort_dir: str | Path) -> list[dict]:
    """The rows of a cohort's ``cohort.csv`` (all values strings)."""
    with open(Path(cohort_dir) / "cohort.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def cohort_counts(rows: list[dict]) -> dict:
    """Subjects, normal and abnormal ones, and lesions per size class of a cohort's rows."""
    vols = [float(v) for r in rows if r.get("lesion_volumes_mm3") for v in r["lesion_volumes_mm3"].split(";")]
    n_abn = sum(r["abnormal"] == "1" for r in rows)
    return {
        "n_subjects": len(rows),
        "n_normal": len(rows) - n_abn,
        "n_abnormal": n_abn,
        "lesions": {c: sum(size_class(v) == c for v in vols) for c in SIZE_CLASSES},
    }


# ----------------------------------------------------------------------------------------------
# previews
# ----------------------------------------------------------------------------------------------


def preview_rows(rows: list[dict], n_each: int) -> list[dict]:
    """The first ``n_each`` normal and the first ``n_each`` abnormal rows of a cohort."""
    normal = [r for r in rows if r["abnormal"] == "0"][:n_each]
    return normal + [r for r in rows if r["abnormal"] == "1"][:n_each]


def largest_lesion_centre(label: np.ndarray) -> list[int]:
    """Voxel centre of the largest 26-connected lesion of ``label``, else the centre of the volume."""
    lesions = label > 0
    if not lesions.any():
        return [s // 2 for s in label.shape]
    comp, n = ndimage.label(lesions, structure=np.ones((3, 3, 3), bool))
    biggest = 1 + int(np.argmax(ndimage.sum(lesions, comp, index=np.arange(1, n + 1))))
    return [int(round(c)) for c in ndimage.center_of_mass(comp == biggest)]


def save_figure(fig, png: str | Path) -> Path:  # noqa: ANN001 - a matplotlib Figure
    """Save a preview figure (110 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
