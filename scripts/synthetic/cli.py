"""``python -m scripts synth``: write a synthetic brain-MRI or chest-CT cohort from the command line.

Usage from the bundle root::

    python -m scripts synth --out demo_data --n_normal 20 --n_abnormal 12 --shape 96 --contrast t1 --seed 0
    python -m scripts synth --organ lung --out demo_data_lung --scale 0.4 --spacing 1.5,1.5,2.5
    python -m scripts synth --help

The cohort is ``images/ labels/ masks/ cohort.csv`` in ``--out``. Options the user does not give are
left to the generator (:func:`scripts.synthetic.brain.generate_cohort`,
:func:`scripts.synthetic.lung.generate_cohort`), so their defaults live in one place. Bad options and
bad inputs (an existing non-empty ``--out`` without ``--overwrite``, a missing template) are one
``cs3f: error: ...`` line on stderr: exit code 2 for a bad command line, 1 for a failed generation.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from scripts.synthetic import brain, lung

__all__ = ["build_parser", "main"]

PROG = "python -m scripts synth"
ORGANS = ("brain", "lung")
DEFAULT_OUT = {"brain": "demo_data", "lung": "demo_data_lung"}
#: errors of the inputs (files, folders, values, optional packages): shown as one line, no traceback
INPUT_ERRORS = (FileExistsError, FileNotFoundError, ImportError, ValueError)


class _OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one ``cs3f: error: ...`` line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"cs3f: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------
# option values
# ----------------------------------------------------------------------------------------------


def _numbers(cast: Callable[[str], float | int], counts: Sequence[int]) -> Callable[[str], tuple]:
    """Parser of ``a,b,...`` (brackets and spaces allowed, e.g. ``"(20, 20000)"``) into a tuple of
    ``cast`` values, one of ``counts`` long; a single value is a tuple of one."""

    def parse(text: str) -> tuple:
        wanted = " or ".join(map(str, counts))
        parts = [p for p in text.strip().strip("()[]").replace(",", " ").split() if p]
        try:
            values = tuple(cast(p) for p in parts)
        except ValueError:
            values = ()
        if len(values) not in counts:
            raise argparse.ArgumentTypeError(f"expected {wanted} numbers, got {text!r}")
        return values

    parse.metavar = "MIN,MAX" if tuple(counts) == (2,) else None  # type: ignore[attr-defined]
    return parse


def _pair(cast: Callable[[str], float | int]) -> Callable[[str], tuple]:
    return _numbers(cast, (2,))


def _shape(text: str) -> int | tuple[int, int, int]:
    values = _numbers(int, (1, 3))(text)
    return values[0] if len(values) == 1 else values


def _spacing(text: str) -> tuple[float, ...]:
    return _numbers(float, (1, 3))(text)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_count = _int_at_least(0)
_positive_int = _int_at_least(1)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# ----------------------------------------------------------------------------------------------
# the parser
# ----------------------------------------------------------------------------------------------

#: organ-specific options: (name, type, help); their defaults are read from the generator
_BRAIN_OPTIONS: tuple[tuple[str, Callable, str], ...] = (
    ("shape", _shape, "output grid: one int (a cube) or three, e.g. 96 (2 mm voxels) or 224"),
    ("contrast", str.lower, "t1, t2 or flair (FLAIR-like)"),
    ("base", str, "template anatomy: mni152, colin27 or both"),
    ("fov_mm", float, "side of the output cube (mm)"),
    ("lesion_contrast", _pair(float), "min,max relative contrast of the lesion core"),
    ("p_hyper", float, "probability of a hyper-intense lesion"),
    ("edema", _bool, "allow an edema rim on medium-large lesions (true/false)"),
    ("necrosis", _bool, "allow a necrotic core on large lesions (true/false)"),
    ("mass_effect", float, "push of the tissue around a lesion (0 disables)"),
    ("affine_scale", float, "per-subject affine scale residual"),
    ("affine_rot_deg", float, "per-subject rotation (degrees)"),
    ("affine_shift_mm", float, "per-subject shift (mm)"),
    ("deform_mm", float, "smooth displacement amplitude (mm)"),
    ("deform_smooth_mm", float, "smoothing length of the displacement (mm)"),
    ("ventricle", float, "ventricle enlargement/shrinkage"),
    ("atrophy", float, "cortical atrophy"),
    ("bias", float, "bias field amplitude"),
    ("noise", float, "Rician noise level"),
    ("blur", float, "blur (voxels)"),
)
_LUNG_OPTIONS: tuple[tuple[str, Callable, str], ...] = (
    ("scale", float, "anatomy size (1.0 = adult)"),
    ("spacing", _spacing, "voxel size (mm): one number or x,y,z"),
    ("mask_format", str, "lung masks: labels (1 = right, 2 = left) or binary"),
    ("axcodes", str, "storage orientation, e.g. LPS or RAS"),
    ("lesion_hu", _pair(float), "min,max lesion HU"),
    ("max_lesion_fraction", float, "largest lesion as a fraction of its lung"),
    ("vessel_generations", _positive_int, "generations of the vessel trees"),
    ("airway_generations", _positive_int, "generations of the airway trees"),
    ("noise_hu", _pair(float), "min,max noise standard deviation (HU)"),
    ("ribs", _bool, "draw ribs (true/false)"),
    ("shift_mm", float, "body shift in the field of view (mm, at scale 1)"),
    ("rot_deg", float, "rotation about the body axis (degrees)"),
    ("origin_mm", float, "affine origin jitter (mm)"),
)
_CHOICES = {"contrast": tuple(brain.TISSUE_MEANS), "base": (*brain.BASES, "both"), "mask_format": lung.MASK_FORMATS}
BRAIN_OPTIONS = frozenset(name for name, _, _ in _BRAIN_OPTIONS)
LUNG_OPTIONS = frozenset(name for name, _, _ in _LUNG_OPTIONS)


def _defaults(*functions: Callable) -> dict:
    """Parameter defaults of the generator functions (the first one that has a name wins)."""
    out: dict = {}
    for fn in functions:
        for name, p in inspect.signature(fn).parameters.items():
            if p.default is not inspect.Parameter.empty:
                out.setdefault(name, p.default)
    return out


def _default_text(value) -> str:  # noqa: ANN001 - any default value
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _add(group, name: str, kind: Callable, text: str, defaults: dict) -> None:  # noqa: ANN001
    kwargs: dict = {"type": kind, "default": argparse.SUPPRESS}
    kwargs["metavar"] = getattr(kind, "metavar", None) or name.upper()
    if name in _CHOICES:
        kwargs["choices"] = _CHOICES[name]
        kwargs.pop("metavar")
    if kind is _bool:  # --edema alone means true
        kwargs.update(nargs="?", const=True)
    shown = f" (default: {_default_text(defaults[name])})" if name in defaults else ""
    group.add_argument(f"--{name}", help=text + shown, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``synth`` command line: common, brain-only and lung-only options."""
    parser = _OneLineParser(
        prog=PROG,
        description="Write a synthetic cohort (images/ labels/ masks/ cohort.csv) for the demo, tests and "
        "studies. Options not given take the generator's defaults.",
    )
    brain_defaults = _defaults(brain.generate_cohort, brain.generate_subject)
    lung_defaults = _defaults(lung.generate_cohort, lung.generate_subject)
    common = parser.add_argument_group("cohort")
    common.add_argument("--organ", choices=ORGANS, default="brain", help="brain MRI or chest CT (default: brain)")
    common.add_argument(
        "--out", default=None, help="output folder (default: demo_data, or demo_data_lung with --organ lung)"
    )
    _add(common, "n_normal", _count, "normal subjects", brain_defaults)
    _add(common, "n_abnormal", _count, "subjects with lesions", brain_defaults)
    _add(common, "seed", int, "random seed", brain_defaults)
    _add(common, "workers", _positive_int, "processes generating subjects (same cohort)", brain_defaults)
    _add(common, "lesion_volume", _pair(float), "min,max lesion volume (mm^3), log-uniform", brain_defaults)
    _add(common, "lesions_per_subject", _pair(int), "min,max lesions of an abnormal subject", brain_defaults)
    common.add_argument("--preview", default=None, help="also write a PNG montage of a few subjects here")
    common.add_argument(
        "--overwrite", type=_bool, nargs="?", const=True, default=False, help="replace an existing --out"
    )
    common.add_argument("--quiet", type=_bool, nargs="?", const=True, default=False, help="no per-subject lines")
    native = parser.add_argument_group("native space (--organ brain): scans as they come off scanners")
    native.add_argument(
        "--native_space",
        type=_bool,
        nargs="?",
        const=True,
        default=False,
        help="move each subject by a known random transform (rotations up to 15 deg, shifts up to 20 mm, scale "
        "0.9-1.1) onto its own 1.2 x 1.2 x 2.0 mm grid; --out gets the moved cohort (no mask column; true "
        "transforms in transforms/), <out>_registered the cohort before the move (default: false)",
    )
    native.add_argument(
        "--skull",
        type=_bool,
        nargs="?",
        const=True,
        default=False,
        help="with --native_space: draw a scalp and skull around the brain before the move (default: false)",
    )
    group = parser.add_argument_group("brain MRI (--organ brain)")
    for name, kind, text in _BRAIN_OPTIONS:
        _add(group, name, kind, text, brain_defaults)
    group = parser.add_argument_group("chest CT (--organ lung)")
    for name, kind, text in _LUNG_OPTIONS:
        _add(group, name, kind, text, lung_defaults)
    return parser


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------


def _print_brain_summary(path: Path, given: dict) -> None:
    stats = brain.summarize_cohort(path)
    defaults = _defaults(brain.generate_cohort)
    contrast, base = (str(given.get(k, defaults[k])).lower() for k in ("contrast", "base"))
    print(
        f"  subjects: {stats['n_subjects']} ({stats['n_normal']} normal, {stats['n_abnormal']} abnormal), "
        f"contrast {contrast}, base {base}, shape {stats['shape']}, spacing "
        f"{'x'.join(f'{s:.3g}' for s in stats['spacing_mm'])} mm"
    )
    _print_lesions(stats["lesions"])
    print(f"  mean pairwise brain-mask Dice: {stats['mask_dice']:.3f}")


def _print_lung_summary(path: Path, given: dict) -> None:
    stats = lung.summarize_cohort(path)
    defaults = _defaults(lung.generate_cohort)
    scale, mask_format = (given.get(k, defaults[k]) for k in ("scale", "mask_format"))
    print(
        f"  subjects: {stats['n_subjects']} ({stats['n_normal']} normal, {stats['n_abnormal']} abnormal), "
        f"scale {scale}, spacing {'x'.join(f'{s:.3g}' for s in stats['spacing_mm'])} mm, "
        f"{stats['orientation']}, {len(stats['shapes'])} different grids"
    )
    _print_lesions(stats["lesions"], f"; lung volumes {stats['lung_ml'][0]:.0f}-{stats['lung_ml'][1]:.0f} ml")
    print(f"  lung masks: {'1 = right, 2 = left' if mask_format == 'labels' else 'binary (0/1)'}")


def _print_lesions(lesions: dict, tail: str = "") -> None:
    print(
        f"  lesions: {sum(lesions.values())} (small <100 mm3: {lesions['small']}, "
        f"medium: {lesions['medium']}, large >1000 mm3: {lesions['large']}){tail}"
    )


def _check_organ_options(parser: argparse.ArgumentParser, organ: str, given: dict) -> None:
    foreign = sorted(set(given) & (LUNG_OPTIONS if organ == "brain" else BRAIN_OPTIONS))
    if foreign:
        other = "lung" if organ == "brain" else "brain"
        names = ", ".join(f"--{n}" for n in foreign)
        parser.error(f"{names}: {other} option(s), not for --organ {organ}")


def _generator_args(args: dict) -> dict:
    """The options of a brain cohort that shape each subject's anatomical affine."""
    keys = ("seed", "shape", "fov_mm", "affine_scale", "affine_rot_deg", "affine_shift_mm", "deform_mm")
    return {k: args[k] for k in (*keys, "deform_smooth_mm", "ventricle", "atrophy") if k in args}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``synth`` command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = vars(parser.parse_args(argv))
        _check_organ_options(parser, args["organ"], args)
        if (args["native_space"] or args["skull"]) and args["organ"] != "brain":
            parser.error("--native_space, --skull: brain options, not for --organ lung")
    except SystemExit as stop:  # --help (0), or a bad command line, already shown as one line (2)
        return int(stop.code or 0)
    organ, out, preview = args.pop("organ"), args.pop("out"), args.pop("preview")
    quiet, native, skull = args.pop("quiet"), args.pop("native_space"), args.pop("skull")
    generate = brain.generate_cohort if organ == "brain" else lung.generate_cohort
    out = Path(out or DEFAULT_OUT[organ])
    t0 = time.perf_counter()
    try:
        if native:
            from scripts.synthetic.native_space import move_cohort

            registered = generate(out.parent / f"{out.name}_registered", verbose=not quiet, **args)
            path = move_cohort(
                registered,
                out,
                seed=args.get("seed", 0),
                skull=skull,
                generator=_generator_args(args),
                overwrite=args.get("overwrite", False),
                verbose=not quiet,
            )
        else:
            path = generate(out, verbose=not quiet, **args)
    except INPUT_ERRORS as err:
        print(f"cs3f: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    kind = "cohort" if organ == "brain" else "lung CT cohort"
    print(f"{kind} written to {path.resolve()}  (images/, labels/, masks/, cohort.csv)")
    (_print_brain_summary if organ == "brain" else _print_lung_summary)(path, args)
    print(f"  generated in {seconds:.1f} s")
    if preview:
        save = brain.save_preview if organ == "brain" else lung.save_preview
        print(f"  preview: {save(path, preview).resolve()}")
    return 0
