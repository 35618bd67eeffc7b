"""Shared test utilities: the bundle command in a subprocess, the bundle in-process, a tiny
deterministic encoder and toy volumes."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: the bundle root: the folder the user runs ``python -m monai.bundle run`` from
ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/inference.json"
#: tiny, fast settings for 16^3-32^3 cohorts (R = 32, q = 8), as command-line overrides ...
FAST_ARGS = ("--image_size", "32", "--q", "[8,8,8]", "--quiet", "true")
#: ... and as ConfigWorkflow overrides
FAST = {"image_size": 32, "q": [8, 8, 8], "quiet": True}
Arg = str | os.PathLike


def _config_arg(config_file: str | Sequence[str]) -> str:
    if isinstance(config_file, str | os.PathLike):
        return str(config_file)
    return "[" + ",".join(repr(str(c)) for c in config_file) + "]"


def bundle_command(*args: Arg, config_file: str | Sequence[str] = CONFIG, nproc: int | None = None) -> list[str]:
    """``python -m monai.bundle run --config_file CONFIG ARGS`` (under torchrun with ``nproc``)."""
    launcher = [sys.executable, "-m"]
    if nproc:
        launcher += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    return [*launcher, "monai.bundle", "run", "--config_file", _config_arg(config_file), *map(str, args)]


def bundle_env() -> dict[str, str]:
    """The test process's environment with the Hugging Face hub offline (nothing is downloaded)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_bundle(
    *args: Arg, config_file: str | Sequence[str] = CONFIG, nproc: int | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """The user-facing command in a subprocess, from the bundle root (for what only a real process
    shows: the exit code, stderr, a kill). Returns the finished process (text stdout/stderr)."""
    return subprocess.run(
        bundle_command(*args, config_file=config_file, nproc=nproc),
        cwd=ROOT,
        env=bundle_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_bundle(*args: Arg, config_file: str | Sequence[str] = CONFIG) -> subprocess.Popen:
    """The same command started in the background (output discarded), e.g. to kill it."""
    return subprocess.Popen(
        bundle_command(*args, config_file=config_file),
        cwd=ROOT,
        env=bundle_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def assert_success(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_one_error_line(proc: subprocess.CompletedProcess) -> str:
    """README: a bad input is one line ``cs3f: error: ...`` and exit code 1, no traceback.

    Returns that line."""
    tail = proc.stderr[-3000:]
    assert proc.returncode == 1, f"exit code {proc.returncode}, expected 1; stderr:\n{tail}"
    assert "Traceback" not in proc.stderr, tail
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("cs3f: error: "), tail
    return lines[-1]


def run_workflow(config_file: str | Sequence[str] = CONFIG, **overrides):  # noqa: ANN201
    """The same run in-process through MONAI's ConfigWorkflow (saves an interpreter start): the
    bundle's configs under ``overrides`` (on top of :data:`FAST`); returns the parsed ``evaluator``."""
    from monai.bundle import ConfigWorkflow

    files = [config_file] if isinstance(config_file, str | os.PathLike) else list(config_file)
    workflow = ConfigWorkflow(
        config_file=[str(ROOT / f) for f in files], workflow_type="infer", **{**FAST, **overrides}
    )
    workflow.initialize()
    workflow.run()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    workflow.finalize()
    return evaluator


class TinyEncoder(torch.nn.Module):
    """A fixed random 2-layer patch encoder with the SliceEncoder interface (fast, for unit tests).

    Layer 0: stride-4 patches, 8 channels; layer 1: stride-8 patches, 12 channels.
    """

    name = "tiny"

    def __init__(self, input_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.input_size = input_size
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.25, 0.25, 0.25)
        self.conv1 = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.conv2 = torch.nn.Conv2d(8, 12, 2, stride=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.calls = 0
        self.max_batch = 0
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        self.max_batch = max(self.max_batch, x.shape[0])
        f1 = F.gelu(self.conv1(x))
        return [f1, F.gelu(self.conv2(f1))]


def blob_cohort(n: int = 8, size: int = 32, abnormal: tuple[int, ...] = (2, 5), seed: int = 0):
    """Smooth random volumes sharing one anatomy, with a bright blob in the ``abnormal`` ones.

    Returns ``(volumes [n, 1, S, S, S] in [0, 1], blob masks [n, 1, S, S, S] bool)``.
    """
    gen = torch.Generator().manual_seed(seed)
    base = F.avg_pool3d(torch.rand(1, 1, size, size, size, generator=gen), 5, stride=1, padding=2)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    vols, blobs = [], []
    for i in range(n):
        noise = F.avg_pool3d(torch.rand(1, 1, size, size, size, generator=gen), 5, stride=1, padding=2)
        vol = 0.7 * base + 0.3 * noise
        vol = (vol - vol.min()) / (vol.max() - vol.min())
        blob = torch.zeros(1, 1, size, size, size, dtype=torch.bool)
        if i in abnormal:
            centre = torch.randint(size // 3, 2 * size // 3, (3,), generator=gen).float()
            dist = (grid - centre.view(3, 1, 1, 1)).norm(dim=0)
            blob = (dist <= size / 8)[None, None]
            vol = torch.where(blob, torch.ones_like(vol), vol)
        vols.append(vol)
        blobs.append(blob)
    return torch.cat(vols), torch.cat(blobs)


def robust_z_peak(scores: np.ndarray, mask: np.ndarray) -> float:
    """The robust-z subject score from its definition, in numpy, independent of the bundle's torch code:
    ``(max - median) / (1.4826 MAD)`` over the foreground, with the lower median (as torch takes it)."""
    values = np.sort(scores[mask])
    median = values[(values.size - 1) // 2]
    mad = np.sort(np.abs(values - median))[(values.size - 1) // 2]
    return float((values[-1] - median) / (1.4826 * mad))


def float64_brute_force(
    tokens: torch.Tensor, valid: torch.Tensor | None, rho: float, groups: list | None = None
) -> torch.Tensor:
    """Eq. 1-2 in float64 over all tokens at once: ``tokens [B, N, d]`` -> scores ``[B, N]`` (scans of
    one subject, equal entries of ``groups``, are not references for each other)."""
    from scripts.scoring import num_neighbours

    b, n, d = tokens.shape
    valid = torch.ones(b, n, dtype=torch.bool) if valid is None else valid
    groups = list(range(b)) if groups is None else groups
    flat = tokens.reshape(b * n, d).double()
    dist = torch.cdist(flat, flat)
    dist[:, ~valid.reshape(-1)] = math.inf
    per_volume = dist.view(b * n, b, n).min(dim=2).values.view(b, n, b)
    out = torch.zeros(b, n, dtype=torch.float64)
    for i in range(b):
        others = [j for j in range(b) if groups[j] != groups[i]]
        k = num_neighbours(len(others) + 1, rho)
        out[i] = per_volume[i][:, others].sort(dim=1).values[:, :k].mean(dim=1)
    return torch.where(valid, out, 0.0)


def float32_distance_tolerance(tokens: torch.Tensor) -> float:
    """Worst-case error of a float32 distance between two of ``tokens [..., d]`` formed as
    ``|p|^2 + |t|^2 - 2 p.t``: the squared distance is off by at most ``gamma_(d+2) (|p|^2 + |t|^2)``
    (``gamma_n = n u / (1 - n u)``, ``u = 2^-24``), and ``|sqrt(a) - sqrt(b)| <= sqrt(|a - b|)``. A mean
    of K such distances, whichever near-equal reference each scorer picks, is within the same bound."""
    u = 2.0**-24
    n = tokens.shape[-1] + 2
    gamma = n * u / (1 - n * u)
    max_sq_norm = float(tokens.double().pow(2).sum(-1).max())
    return math.sqrt(gamma * 2 * max_sq_norm)


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """``(voxels as stored, affine, on-disk dtype)`` of a NIfTI file."""
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine, img.get_data_dtype()


def read_cohort_csv(folder: Path) -> list[dict]:
    """The rows of ``folder/cohort.csv``."""
    with open(folder / "cohort.csv", newline="") as fh:
        return list(csv.DictReader(fh))
