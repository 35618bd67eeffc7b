"""``python -m scripts.benchmarks registration``: registration to MNI152 on native-space scans (docs/registration.md).

Sections: ``native``, the demo cohort moved onto native grids by known transforms (error of the found affine in
mm over the template's brain voxels, template-mask Dice, seconds, quality, peak RSS); ``colin27``, the Colin27
head (Debian ``mricron-data``) as it is and moved; ``--bundle``: detection on the registered and native cohorts;
``--libraries N``: SimpleITK, itk-elastix and ANTsPy (each where installed) on the first N native volumes.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import time
from pathlib import Path
from resource import RUSAGE_SELF, getrusage

import nibabel as nib
import numpy as np
from scripts.benchmarks.common import bundle_command
from scripts.benchmarks.tables import table
from scripts.synthetic.cohort_files import read_cohort
from scripts.transforms.affine_registration import estimate_affine, load_template, registration_quality, resample_to

COLIN27_HEAD = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN27_BRAIN = COLIN27_HEAD.with_name("ch2bet.nii.gz")
KEYS = ("patient_auroc", "voxel_ap", "dice_max", "fp_per_volume")
#: the registration libraries compared: distribution -> (module, the version measured in docs/registration.md)
LIBRARIES = {"simpleitk": ("SimpleITK", "2.5.7"), "itk-elastix": ("itk", "0.25.4"), "antspyx": ("ants", "0.6.3")}


def _measure(template, image, affine, brain, threads: int, truth=None, register=None) -> tuple[np.ndarray, dict]:
    """Register ``image`` (``register``, default the bundle's): the affine, its error, Dice, seconds and quality."""
    register = register or (lambda t, moving, grid: estimate_affine(moving, grid, t, threads=threads)[0])
    start, cpu = time.perf_counter(), time.process_time()
    found = register(template, image, affine)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    figures = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    if truth is not None:  # distances (mm) between the found and true affines over the template's brain voxels
        points = np.c_[np.argwhere(template.mask), np.ones(int(template.mask.sum()))] @ template.affine.T
        distance = np.linalg.norm((points @ (found - truth).T)[:, :3], axis=1)
        figures |= {"error_mean_mm": round(float(distance.mean()), 3), "error_max_mm": round(float(distance.max()), 3)}
    moved_mask = resample_to(template.mask.astype(np.float32), found @ template.affine, brain.shape, affine, 1) > 0.5
    figures["mask_dice"] = round(float(2 * (moved_mask & brain).sum() / max(1, moved_mask.sum() + brain.sum())), 4)
    moved = resample_to(image, affine, template.image.shape, found @ template.affine, 1)
    return found, figures | registration_quality(moved, template, found, 6.0)


def native_section(native: Path, threads: int, limit: int | None, register=None) -> dict:
    """Per-volume registration accuracy, time and quality (:func:`_measure`) on a native-space cohort."""
    volumes = []
    for row in read_cohort(native)[:limit]:
        nii = nib.load(str(native / row["image"]))
        truth = np.asarray(json.loads((native / row["transform"]).read_text())["template_to_native"])
        brain = np.asarray(nib.load(str(native / row["brain_mask"])).dataobj) > 0
        image = np.asarray(nii.dataobj, np.float32)
        _, figures = _measure(load_template("mni152"), image, nii.affine, brain, threads, truth, register)
        volumes.append({"image": Path(row["image"]).name, "shape": list(image.shape), **figures})
        print(f"  {volumes[-1]}", flush=True)
    summary = {}
    for k in ("error_mean_mm", "error_max_mm", "mask_dice", "wall_s", "cpu_s", "coverage", "metric"):
        values = [v[k] for v in volumes]
        worst = min(values) if k in ("mask_dice", "coverage") else max(values)
        summary[k] = {"mean": float(np.mean(values)), "worst": float(worst)}
    peak = round(getrusage(RUSAGE_SELF).ru_maxrss / 1024, 1)  # this process: torch, MONAI, SimpleITK, template
    return {"volumes": volumes, "summary": summary, "peak_rss_mb": peak, "threads": threads}


def colin27_section(threads: int, seed: int = 0) -> dict:
    """Colin27 with its skull to MNI152, as it is and moved by a known transform onto another grid."""
    from scipy import ndimage
    from scripts.synthetic.native_space import random_motion

    if not COLIN27_HEAD.is_file():
        return {"skipped": f"{COLIN27_HEAD} missing: apt-get install mricron-data"}
    template = load_template("mni152")
    head_nii = nib.load(str(COLIN27_HEAD))
    head = np.asarray(head_nii.dataobj, np.float32)
    brain = np.asarray(nib.load(str(COLIN27_BRAIN)).dataobj) > 0
    transform, as_is = _measure(template, head, head_nii.affine, brain, threads)
    centre = head_nii.affine[:3, :3] @ ((np.asarray(head.shape) - 1) / 2.0) + head_nii.affine[:3, 3]
    motion = random_motion(np.random.default_rng([seed, 27]), centre, 15.0, 20.0, (0.9, 1.1))
    grid, shape = np.diag([1.2, 1.2, 2.0, 1.0]), (170, 200, 110)
    grid[:3, 3] = centre - grid[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    pull = np.linalg.inv(head_nii.affine) @ np.linalg.inv(motion) @ grid
    moved = ndimage.affine_transform(head, pull[:3, :3], pull[:3, 3], output_shape=shape, order=1)
    moved_brain = ndimage.affine_transform(
        brain.astype(np.uint8), pull[:3, :3], pull[:3, 3], output_shape=shape, order=0
    )
    _, figures = _measure(template, moved, grid, moved_brain > 0, threads, truth=motion @ transform)
    return {"as_is": as_is, "moved": figures}


def _itk_affine(values, centre) -> np.ndarray:
    """The 4 x 4 affine of ITK affine transform parameters (matrix, translation) about ``centre``."""
    values, centre, out = np.asarray(values, float), np.asarray(centre, float), np.eye(4)
    out[:3, :3], out[:3, 3] = values[:9].reshape(3, 3), centre + values[9:] - values[:9].reshape(3, 3) @ centre
    return out


def _elastix(itk, template, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """itk-elastix with its default ``affine`` parameter map (Mattes MI, 4 resolutions)."""

    def to_itk(array, grid):
        out = itk.image_from_array(np.ascontiguousarray(np.transpose(array, (2, 1, 0)).astype(np.float32)))
        spacing = np.linalg.norm(grid[:3, :3], axis=0)
        out.SetOrigin(grid[:3, 3].tolist()), out.SetSpacing(spacing.tolist())
        out.SetDirection(itk.matrix_from_array(grid[:3, :3] / spacing))
        return out

    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    fixed, moving = to_itk(template.image, template.affine), to_itk(image, affine)
    _, found = itk.elastix_registration_method(fixed, moving, parameter_object=parameters, log_to_console=False)
    found = found.GetParameterMap(0)
    return _itk_affine(*(np.array(found[k], float) for k in ("TransformParameters", "CenterOfRotationPoint")))


def _ants(ants, template, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """ANTsPy's ``type_of_transform="Affine"`` (Mattes MI)."""

    def to_ants(array, grid):
        spacing = np.linalg.norm(grid[:3, :3], axis=0)
        return ants.from_numpy(array.astype(np.float32), grid[:3, 3].tolist(), spacing.tolist(), grid[:3, :3] / spacing)

    out = ants.registration(to_ants(template.image, template.affine), to_ants(image, affine), "Affine")
    transform = ants.read_transform(out["fwdtransforms"][0])
    return _itk_affine(transform.parameters, transform.fixed_parameters)


def _library(name: str) -> tuple:
    """Library ``name``'s ``register`` (``None``: the bundle's), version, licence, size; ImportError: what to get."""
    module, version = LIBRARIES[name]
    try:
        library, dist = importlib.import_module(module), importlib.metadata.distribution(name)
    except (ImportError, importlib.metadata.PackageNotFoundError) as err:
        raise ImportError(f"{name} is not installed ({err}): pip install {name}=={version} to compare it") from None
    about = {"version": dist.version, "licence": dist.metadata.get("License-Expression") or dist.metadata["License"]}
    about["installed_mb"] = round(sum(f.size or 0 for f in dist.files or ()) / 2**20, 1)
    method = {"itk-elastix": _elastix, "antspyx": _ants}.get(name)
    return method and (lambda t, moving, grid: method(library, t, moving, grid)), about


def libraries_section(native: Path, limit: int, threads: int, names=tuple(LIBRARIES)) -> dict:
    """Each library of ``names`` on the first ``limit`` native volumes (:func:`native_section`), or why not."""
    out = {}
    for name in names:
        try:
            register, out[name] = _library(name)
            out[name] |= native_section(native, threads, limit, register)
        except ImportError as err:
            out[name] = {"skipped": str(err)}
    return out


def _bundle(dataset: Path, output: Path, **extra: str) -> dict:
    args = {"dataset_dir": dataset, "output_dir": output, "quiet": True, "plots": False, **extra}
    start = time.perf_counter()
    subprocess.run(bundle_command(["configs/inference.json", "configs/evaluate.json"], args), check=True)
    metrics = json.loads((output / "metrics.json").read_text())
    peak = json.loads((output / "run.json").read_text())["peak_rss_mb"]
    return {"metrics": metrics, "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": peak}


def detection_section(registered: Path, native: Path, out: Path) -> dict:
    """Detection metrics of the registered cohort (its masks; as it is and ``--register mni152``) and the native
    one (``--register mni152``, no masks)."""
    from scripts.engine.datalist import make_datalist
    from scripts.evaluation.report import evaluate_outputs

    result = {"registered": _bundle(registered, out / "runs" / "registered")}
    result["registered_mni152"] = _bundle(registered, out / "runs" / "registered_mni152", register="mni152")
    result["native"] = _bundle(native, out / "runs" / "native", register="mni152")
    # the native maps inside the true brain masks: the registered run's evaluation region
    rows = make_datalist(native, masks=False, labels=True, require_same_grid=False)
    brains = {Path(r["image"]).name: r["brain_mask"] for r in read_cohort(native)}
    datalist = [{**r, "mask": str(native / brains[Path(r["image"]).name])} for r in rows]
    result["native_in_brain"] = evaluate_outputs(datalist, out / "runs" / "native", plots=False, quiet=True)
    return result


def overlay(native: Path, run: Path, name: str, png: Path) -> Path:
    """Three slices of the native scan ``name`` through its largest lesion, the anomaly map of ``run`` over it
    (its own grid, no resampling) and the lesion outline: docs/registration_overlay.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scripts.synthetic.cohort_files import largest_lesion_centre, save_figure

    image = np.asarray(nib.load(str(native / "images" / f"{name}.nii.gz")).dataobj)
    label = np.asarray(nib.load(str(native / "labels" / f"{name}.nii.gz")).dataobj) > 0
    nii = nib.load(str(run / f"{name}_anomaly.nii.gz"))
    amap, spacing = np.asarray(nii.dataobj), nii.header.get_zooms()[:3]
    centre = largest_lesion_centre(label)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    low, top = (float(np.percentile(amap[amap > 0], q)) for q in (97.0, 99.9)) if (amap > 0).any() else (0.5, 1.0)
    for axis, ax in enumerate(axes):
        take = tuple(centre[axis] if i == axis else slice(None) for i in range(3))
        img, lab, heat = (np.asarray(a[take]).T for a in (image, label, amap))
        rest = [spacing[i] for i in range(3) if i != axis]
        ax.imshow(img, cmap="gray", origin="lower", interpolation="nearest", aspect=rest[1] / rest[0])
        heat = np.ma.masked_less(heat, low)
        ax.imshow(heat, cmap="hot", origin="lower", alpha=0.7, vmin=low, vmax=top, aspect=rest[1] / rest[0])
        if lab.any():
            ax.contour(lab.astype(float), levels=[0.5], colors="c", linewidths=0.8, origin="lower")
        ax.set_title(f"{name} (native grid): voxel axis {axis} = {centre[axis]}; map top 3 %", fontsize=8)
        ax.set(xticks=[], yticks=[])
    return save_figure(fig, png)


def markdown(results: dict) -> str:
    """The table of ``registration.md``."""
    rows = []
    if "native" in results:
        s, n = results["native"]["summary"], f"native ({len(results['native']['volumes'])} volumes)"
        error = f"{s['error_mean_mm']['mean']:.2f} / {s['error_max_mm']['worst']:.2f}"
        rows.append([n, "error mm: mean of the means / largest max", error])
        dice = f"{s['mask_dice']['mean']:.3f} / {s['mask_dice']['worst']:.3f}"
        rows.append([n, "template-mask Dice: mean / smallest", dice])
        seconds = f"{s['wall_s']['mean']:.1f} / {s['cpu_s']['mean']:.1f} "
        seconds += f"({s['wall_s']['worst']:.1f} / {s['cpu_s']['worst']:.1f})"
        rows.append([n, "seconds per volume: wall / CPU, mean (worst)", seconds])
        rows.append([n, "peak RSS of the process", f"{results['native']['peak_rss_mb']:.0f} MB"])
    for part in ("as_is", "moved"):
        if entry := results.get("colin27", {}).get(part):
            value = f"Dice {entry['mask_dice']:.3f}, coverage {entry['coverage']:.3f}, CPU {entry['cpu_s']:.1f} s"
            if "error_mean_mm" in entry:
                value += f", error {entry['error_mean_mm']:.2f} / {entry['error_max_mm']:.2f} mm"
            rows.append([f"Colin27 {part.replace('_', ' ')}", "mask Dice, quality, time", value])
    for name, lib in results.get("libraries", {}).items():
        cells = ("{error_mean_mm:.2f} / {error_max_mm:.2f}, {cpu_s:.1f}".format(**v) for v in lib.get("volumes", []))
        about = f"{lib.get('version')}, {lib.get('installed_mb')} MB, {lib.get('licence')}: {'; '.join(cells)}"
        rows.append([f"library {name}", "version, size, licence: mm mean / max, CPU s", lib.get("skipped", about)])
    for run in ("registered", "registered_mni152", "native", "native_in_brain"):
        if entry := results.get("detection", {}).get(run):
            metrics = entry.get("metrics", entry)
            rows.append([f"detection {run}", ", ".join(KEYS), ", ".join(f"{metrics[k]:.3f}" for k in KEYS)])
    return table(["section", "quantity", "value"], rows) + "\n"


def main(out: str, threads: int, limit: int | None, bundle: bool, sections: str, libraries: int = 0) -> int:
    """Run the sections (see the module docstring) on the demo cohort (seed 0) and its native-space move."""
    from scripts.synthetic.brain import ensure_cohort
    from scripts.synthetic.native_space import move_cohort

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    registered, native = ensure_cohort(folder / "registered", n_normal=20, n_abnormal=12, seed=0), folder / "native"
    if not (native / "cohort.csv").is_file():
        move_cohort(registered, native, seed=0, generator={"seed": 0})
    results: dict = {}
    if "native" in sections:
        results["native"] = native_section(native, threads, limit)
    if "colin27" in sections:
        results["colin27"] = colin27_section(threads)
    if libraries:
        results["libraries"] = libraries_section(native, libraries, threads)
    if bundle:
        results["detection"] = detection_section(registered, native, folder)
    (folder / "registration.json").write_text(json.dumps(results, indent=1))
    (folder / "registration.md").write_text(markdown(results))
    print(markdown(results))
    return 0
