"""``python -m scripts.benchmarks registration``: registration to MNI152 on native-space scans.

Sections (results in ``<out>/registration.json`` and a markdown table ``<out>/registration.md``):

* **native**: the demo cohort (:func:`scripts.synthetic.brain.generate_cohort`, demo defaults) moved
  onto native grids by known random transforms (:func:`scripts.synthetic.native_space.move_cohort`);
  per volume, :class:`scripts.transforms.registration.Register` (``mni152``): error in mm of the found
  affine against the known one (``template_to_native``: the move composed with the subject's own
  anatomical affine) over the template's brain voxels (mean, max), Dice of the template mask brought
  onto the native grid with the true brain mask, wall and CPU seconds, quality record; peak resident
  memory of this process (torch, MONAI and SimpleITK loaded) after the section;
* **colin27**: the Colin27 head with its skull (``ch2.nii.gz``, Debian ``mricron-data``) registered to
  MNI152, Dice of the MNI152 mask brought onto Colin27 with Colin27's own ``ch2bet`` brain; and Colin27
  moved by a known random transform onto a 1.2 x 1.2 x 2.0 mm grid: error against the move composed
  with the unmoved registration, Dice;
* **detection** (``--bundle``): the bundle with ``configs/evaluate.json`` on the registered cohort with
  its masks, and on the native cohort with ``--register mni152`` and no masks; the native maps are also
  evaluated inside the true brain masks (the registered run's evaluation region).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["add_parser", "main"]

COLIN27_HEAD = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN27_BRAIN = Path("/usr/share/mricron/templates/ch2bet.nii.gz")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``registration`` subcommand."""
    p = sub.add_parser(
        "registration",
        help="registration to MNI152: native-space demo, Colin27, detection before/after the move",
        description="Registration error, template-mask Dice, seconds and memory per volume on the native-space "
        "demo and on Colin27; with --bundle the detection metrics of the moved cohort next to the registered one.",
    )
    p.add_argument("--out", default="bench_out/registration", help="output folder (default %(default)s)")
    p.add_argument("--n_normal", type=int, default=20, help="normal subjects (default %(default)s, the demo's)")
    p.add_argument("--n_abnormal", type=int, default=12, help="abnormal subjects (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="cohort and move seed (default %(default)s)")
    p.add_argument("--skull", action="store_true", help="draw a scalp and skull before the move")
    p.add_argument("--threads", type=int, default=2, help="threads of the registration (default %(default)s)")
    p.add_argument("--limit", type=int, help="register only the first N native volumes")
    p.add_argument("--bundle", action="store_true", help="also run the bundle on both cohorts (detection)")
    p.add_argument("--libraries", type=int, default=0, help="compare the libraries on the first N volumes")
    p.add_argument("--sections", default="native,colin27", help="native, colin27 (default %(default)s)")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _cohorts(out: Path, n_normal: int, n_abnormal: int, seed: int, skull: bool) -> tuple[Path, Path]:
    from scripts.synthetic.brain import ensure_cohort
    from scripts.synthetic.native_space import move_cohort

    registered = ensure_cohort(out / "registered", n_normal=n_normal, n_abnormal=n_abnormal, seed=seed)
    native = out / ("native_skull" if skull else "native")
    if not (native / "cohort.csv").is_file():
        move_cohort(registered, native, seed=seed, skull=skull, generator={"seed": seed})
    return registered, native


def _errors(found, truth, template) -> tuple[float, float]:
    """Mean and max distance (mm) between two template -> image affines over the template's brain voxels."""
    import numpy as np

    points = np.c_[np.argwhere(template.mask), np.ones(int(template.mask.sum()))] @ template.affine.T
    distance = np.linalg.norm((points @ (found - truth).T)[:, :3], axis=1)
    return float(distance.mean()), float(distance.max())


def _mask_dice(template, transform, brain, affine) -> float:
    """Dice of the template mask brought onto the grid ``(brain.shape, affine)`` with the ``brain`` mask."""
    import numpy as np
    from scripts.transforms.affine_registration import resample_to

    moved = resample_to(template.mask.astype(np.float32), transform @ template.affine, brain.shape, affine, 1) > 0.5
    return float(2 * (moved & brain).sum() / max(1, moved.sum() + brain.sum()))


def _register(template, image, affine, threads: int) -> tuple:
    """The affine :func:`estimate_affine` finds, and its (wall, CPU) seconds."""
    from scripts.transforms.affine_registration import estimate_affine

    start, cpu = time.perf_counter(), time.process_time()
    transform, _ = estimate_affine(image, affine, template, threads=threads)
    return transform, (time.perf_counter() - start, time.process_time() - cpu)


def native_section(native: Path, threads: int, limit: int | None) -> dict:
    """Per-volume registration accuracy, time and quality on a native-space cohort."""
    import nibabel as nib
    import numpy as np
    from scripts.synthetic.cohort_files import read_cohort
    from scripts.transforms.affine_registration import load_template, registration_quality, resample_to

    template = load_template("mni152")
    rows = read_cohort(native)[:limit]
    volumes = []
    for row in rows:
        nii = nib.load(str(native / row["image"]))
        image = np.asarray(nii.dataobj, np.float32)
        truth = np.asarray(json.loads((native / row["transform"]).read_text())["template_to_native"])
        transform, (wall, cpu) = _register(template, image, nii.affine, threads)
        brain = np.asarray(nib.load(str(native / row["brain_mask"])).dataobj) > 0
        mean, worst = _errors(transform, truth, template)
        moved = resample_to(image, nii.affine, template.image.shape, transform @ template.affine, 1)
        volumes.append(
            {
                "image": Path(row["image"]).name,
                "shape": list(image.shape),
                "error_mean_mm": round(mean, 3),
                "error_max_mm": round(worst, 3),
                "mask_dice": round(_mask_dice(template, transform, brain, nii.affine), 4),
                "wall_s": round(wall, 2),
                "cpu_s": round(cpu, 2),
                **registration_quality(moved, template, transform, 6.0),
            }
        )
        print(f"  {volumes[-1]}", flush=True)
    keys = ("error_mean_mm", "error_max_mm", "mask_dice", "wall_s", "cpu_s", "coverage", "metric")
    summary = {k: {"mean": float(np.mean([v[k] for v in volumes])), "worst": _worst(k, volumes)} for k in keys}
    return {"volumes": volumes, "summary": summary, "peak_rss_mb": round(_peak_rss_mb(), 1), "threads": threads}


def _worst(key: str, volumes: list[dict]) -> float:
    values = [v[key] for v in volumes]
    return float(min(values) if key in ("mask_dice", "coverage") else max(values))


def colin27_section(threads: int, seed: int) -> dict:
    """Colin27 with its skull to MNI152, as it is and moved by a known transform onto another grid."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage
    from scripts.synthetic.native_space import random_motion
    from scripts.transforms.affine_registration import load_template, registration_quality, resample_to

    if not COLIN27_HEAD.is_file():
        return {"skipped": f"{COLIN27_HEAD} missing: apt-get install mricron-data"}
    template = load_template("mni152")
    head_nii = nib.load(str(COLIN27_HEAD))
    head = np.asarray(head_nii.dataobj, np.float32)
    brain = np.asarray(nib.load(str(COLIN27_BRAIN)).dataobj) > 0
    out = {}
    transform, (wall, cpu) = _register(template, head, head_nii.affine, threads)
    moved = resample_to(head, head_nii.affine, template.image.shape, transform @ template.affine, 1)
    out["as_is"] = {
        "mask_dice": round(_mask_dice(template, transform, brain, head_nii.affine), 4),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        **registration_quality(moved, template, transform, 6.0),
    }
    rng = np.random.default_rng([seed, 27])
    centre = head_nii.affine[:3, :3] @ ((np.asarray(head.shape) - 1) / 2.0) + head_nii.affine[:3, 3]
    motion = random_motion(rng, centre, 15.0, 20.0, (0.9, 1.1))
    grid = np.diag([1.2, 1.2, 2.0, 1.0])
    shape = (170, 200, 110)
    grid[:3, 3] = centre - grid[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    pull = np.linalg.inv(head_nii.affine) @ np.linalg.inv(motion) @ grid
    native = ndimage.affine_transform(head, pull[:3, :3], pull[:3, 3], output_shape=shape, order=1)
    native_brain = ndimage.affine_transform(
        brain.astype(np.uint8), pull[:3, :3], pull[:3, 3], output_shape=shape, order=0
    )
    found, (wall, cpu) = _register(template, native, grid, threads)
    mean, worst = _errors(found, motion @ transform, template)
    moved = resample_to(native, grid, template.image.shape, found @ template.affine, 1)
    out["moved"] = {
        "error_mean_mm": round(mean, 3),
        "error_max_mm": round(worst, 3),
        "mask_dice": round(_mask_dice(template, found, native_brain > 0, grid), 4),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        **registration_quality(moved, template, found, 6.0),
    }
    return out


def _elastix(fixed, fixed_affine, moving, moving_affine):
    """itk-elastix's affine (default ``affine`` parameter map: Mattes MI, 4 resolutions) as a 4 x 4 matrix."""
    import itk
    import numpy as np

    def image(array, affine):
        out = itk.image_from_array(np.ascontiguousarray(np.transpose(array, (2, 1, 0)).astype(np.float32)))
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        out.SetSpacing(spacing.tolist())
        out.SetOrigin(affine[:3, 3].tolist())
        out.SetDirection(itk.matrix_from_array(affine[:3, :3] / spacing))
        return out

    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    _, result = itk.elastix_registration_method(
        image(fixed, fixed_affine), image(moving, moving_affine), parameter_object=parameters, log_to_console=False
    )
    found = result.GetParameterMap(0)
    values = np.array([float(v) for v in found["TransformParameters"]])
    centre = np.array([float(v) for v in found["CenterOfRotationPoint"]])
    return _matrix_of(values[:9].reshape(3, 3), values[9:], centre)


def _ants(fixed, fixed_affine, moving, moving_affine):
    """ANTsPy's ``Affine`` registration (Mattes MI) as a 4 x 4 matrix."""
    import ants
    import numpy as np

    def image(array, affine):
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        return ants.from_numpy(
            array.astype(np.float32),
            origin=affine[:3, 3].tolist(),
            spacing=spacing.tolist(),
            direction=affine[:3, :3] / spacing,
        )

    out = ants.registration(image(fixed, fixed_affine), image(moving, moving_affine), type_of_transform="Affine")
    transform = ants.read_transform(out["fwdtransforms"][0])
    values, centre = np.asarray(transform.parameters), np.asarray(transform.fixed_parameters)
    return _matrix_of(values[:9].reshape(3, 3), values[9:], centre)


def _matrix_of(matrix, translation, centre):

    import numpy as np

    out = np.eye(4)
    out[:3, :3], out[:3, 3] = matrix, centre + translation - matrix @ centre
    return out


def libraries_section(native: Path, limit: int) -> dict:
    """SimpleITK (this bundle's), itk-elastix and ANTsPy on the first ``limit`` native volumes, each where
    importable: error against the known affine and CPU seconds."""
    import nibabel as nib
    import numpy as np
    from scripts.synthetic.cohort_files import read_cohort
    from scripts.transforms.affine_registration import estimate_affine, load_template

    template = load_template("mni152")
    methods = {
        "simpleitk": lambda image, affine: estimate_affine(image, affine, template, threads=2)[0],
        "itk-elastix": lambda image, affine: _elastix(template.image, template.affine, image, affine),
        "antspyx": lambda image, affine: _ants(template.image, template.affine, image, affine),
    }
    out: dict = {}
    for row in read_cohort(native)[:limit]:
        nii = nib.load(str(native / row["image"]))
        image = np.asarray(nii.dataobj, np.float32)
        truth = np.asarray(json.loads((native / row["transform"]).read_text())["template_to_native"])
        for name, method in methods.items():
            start, cpu = time.perf_counter(), time.process_time()
            try:
                found = method(image, nii.affine)
            except ImportError as err:
                out[name] = {"skipped": str(err)}
                continue
            mean, worst = _errors(found, truth, template)
            entry = out.setdefault(name, {"volumes": []})
            entry["volumes"].append(
                {
                    "error_mean_mm": round(mean, 3),
                    "error_max_mm": round(worst, 3),
                    "cpu_s": round(time.process_time() - cpu, 2),
                    "wall_s": round(time.perf_counter() - start, 2),
                }
            )
            print(f"  {name} {row['image']}: {entry['volumes'][-1]}", flush=True)
    return out


def _bundle(dataset: Path, output: Path, *extra: str) -> dict:
    configs = "['configs/inference.json','configs/evaluate.json']"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--dataset_dir", str(dataset)]
    command += ["--output_dir", str(output), "--quiet", "true", "--plots", "false", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    metrics = json.loads((output / "metrics.json").read_text())
    run = json.loads((output / "run.json").read_text())
    return {"metrics": metrics, "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": run["peak_rss_mb"]}


def detection_section(registered: Path, native: Path, out: Path) -> dict:
    """Detection metrics of the registered cohort (its masks) and the native one (``--register mni152``)."""
    from scripts.engine.datalist import make_datalist
    from scripts.evaluation.report import evaluate_outputs
    from scripts.synthetic.cohort_files import read_cohort

    result = {"registered": _bundle(registered, out / "runs" / "registered")}
    result["native"] = _bundle(native, out / "runs" / "native", "--register", "mni152")
    # the native maps inside the true brain masks: the registered run's evaluation region
    rows = make_datalist(native, masks=False, labels=True, require_same_grid=False)
    brains = {Path(r["image"]).name: r["brain_mask"] for r in read_cohort(native)}
    datalist = [{**r, "mask": str(native / brains[Path(r["image"]).name])} for r in rows]
    result["native_in_brain"] = evaluate_outputs(datalist, out / "runs" / "native", plots=False, quiet=True)
    return result


def overlay(native: Path, run: Path, name: str, png: Path) -> Path:
    """Three slices of the native scan ``name`` through its largest lesion, the anomaly map of ``run``
    over it (its own grid, no resampling) and the lesion outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np
    from scripts.synthetic.cohort_files import largest_lesion_centre, save_figure

    image = np.asarray(nib.load(str(native / "images" / f"{name}.nii.gz")).dataobj)
    label = np.asarray(nib.load(str(native / "labels" / f"{name}.nii.gz")).dataobj) > 0
    nii = nib.load(str(run / f"{name}_anomaly.nii.gz"))
    amap, spacing = np.asarray(nii.dataobj), nii.header.get_zooms()[:3]
    centre = largest_lesion_centre(label)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    low, top = (float(np.percentile(amap[amap > 0], q)) for q in (97.0, 99.9)) if (amap > 0).any() else (0.5, 1.0)
    for axis, ax in enumerate(axes):
        take = [slice(None)] * 3
        take[axis] = centre[axis]
        img, lab, heat = (np.asarray(a[tuple(take)]).T for a in (image, label, amap))
        rest = [spacing[i] for i in range(3) if i != axis]
        ax.imshow(img, cmap="gray", origin="lower", interpolation="nearest", aspect=rest[1] / rest[0])
        heat = np.ma.masked_less(heat, low)
        ax.imshow(heat, cmap="hot", origin="lower", alpha=0.7, vmin=low, vmax=top, aspect=rest[1] / rest[0])
        if lab.any():
            ax.contour(lab.astype(float), levels=[0.5], colors="c", linewidths=0.8, origin="lower")
        ax.set_title(f"{name} (native grid): voxel axis {axis} = {centre[axis]}; map top 3 %", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, png)


KEYS = ("patient_auroc", "voxel_ap", "dice_max", "fp_per_volume")


def _row(section: str, quantity: str, value: str) -> str:
    return f"| {section} | {quantity} | {value} |"


def _markdown(results: dict) -> str:
    lines = ["| section | quantity | value |", "|---|---|---|"]
    if "native" in results:
        s = results["native"]["summary"]
        n = f"native ({len(results['native']['volumes'])} volumes)"
        error = f"{s['error_mean_mm']['mean']:.2f} / {s['error_max_mm']['worst']:.2f}"
        lines.append(_row(n, "error mm: mean of the means / largest max", error))
        dice = f"{s['mask_dice']['mean']:.3f} / {s['mask_dice']['worst']:.3f}"
        lines.append(_row(n, "template-mask Dice: mean / smallest", dice))
        worst = f"{s['wall_s']['worst']:.1f} / {s['cpu_s']['worst']:.1f}"
        time_s = f"{s['wall_s']['mean']:.1f} / {s['cpu_s']['mean']:.1f} ({worst})"
        lines.append(_row(n, "seconds per volume: wall / CPU, mean (worst)", time_s))
        lines.append(_row(n, "peak RSS of the process", f"{results['native']['peak_rss_mb']:.0f} MB"))
    for part in ("as_is", "moved"):
        entry = results.get("colin27", {}).get(part)
        if entry:
            value = f"Dice {entry['mask_dice']:.3f}, coverage {entry['coverage']:.3f}, CPU {entry['cpu_s']:.1f} s"
            if "error_mean_mm" in entry:
                value += f", error {entry['error_mean_mm']:.2f} / {entry['error_max_mm']:.2f} mm"
            lines.append(_row(f"Colin27 {part.replace('_', ' ')}", "mask Dice, quality, time", value))
    for run in ("registered", "native", "native_in_brain"):
        entry = results.get("detection", {}).get(run)
        if entry:
            metrics = entry.get("metrics", entry)
            lines.append(_row(f"detection {run}", ", ".join(KEYS), ", ".join(f"{metrics[k]:.3f}" for k in KEYS)))
    return "\n".join(lines) + "\n"


def main(
    out: str = "bench_out/registration",
    n_normal: int = 20,
    n_abnormal: int = 12,
    seed: int = 0,
    skull: bool = False,
    threads: int = 2,
    limit: int | None = None,
    bundle: bool = False,
    libraries: int = 0,
    sections: str = "native,colin27",
) -> int:
    """Run the sections (see the module docstring); returns 0."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    registered, native = _cohorts(folder, n_normal, n_abnormal, seed, skull)
    results: dict = {}
    if "native" in sections:
        results["native"] = native_section(native, threads, limit)
    if "colin27" in sections:
        results["colin27"] = colin27_section(threads, seed)
    if libraries:
        results["libraries"] = libraries_section(native, libraries)
    if bundle:
        results["detection"] = detection_section(registered, native, folder)
    (folder / "registration.json").write_text(json.dumps(results, indent=1))
    table = _markdown(results)
    (folder / "registration.md").write_text(table)
    print(table)
    return 0
