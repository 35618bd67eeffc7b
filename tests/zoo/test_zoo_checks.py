"""The MONAI Model Zoo's premerge checks of the bundle (ci/verify_bundle.py and friends of the Zoo).

Everything that needs no Zoo checkout runs here, as the Zoo runs it: the metadata schema (when a copy of
the schema file the Zoo downloads is given as ``CS3F_ZOO_SCHEMA=/path/to/meta_schema_20240725.json``; the
bundle does not ship third-party files), version and changelog, ``verify_net_in_out`` of
``network_def``, ``models/model.pt`` (reproducible, the sha256 of ``large_files.yml``, loaded by
``network_def``), TorchScript export by trace (the Zoo's scripted export is the documented exclusion),
the required packages, the large files, and that no file of the bundle points outside it. With a Zoo
checkout (``CS3F_ZOO_DIR=/path/to/model-zoo``) ``.ci/zoo_verify`` also runs the Zoo's own scripts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
META = ROOT / "configs" / "metadata.json"
CONFIG = ROOT / "configs" / "inference.json"
SCHEMA = Path(os.environ.get("CS3F_ZOO_SCHEMA", "meta_schema_20240725.json"))
BUNDLE = "brain_mri_cs3f_anomaly_detection"


def _metadata() -> dict:
    return json.loads(META.read_text())


def _network_def():
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser["bundle_root"] = str(ROOT)
    return parser.get_parsed_content("network_def")


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """models/model.pt as ``python -m scripts export_model`` writes it (into a temporary folder)."""
    from scripts.export import export_model

    out = tmp_path_factory.mktemp("models") / "model.pt"
    return out, export_model(out, bundle_root=ROOT)


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_metadata_passes_the_zoo_schema(tmp_path: Path) -> None:
    """The Zoo's verify_metadata_format: MONAI's verify_metadata against meta_schema_20240725.json."""
    if not SCHEMA.is_file():
        pytest.skip("no metadata schema here: set CS3F_ZOO_SCHEMA to a copy of meta_schema_20240725.json")
    meta = _metadata()
    assert meta["schema"].endswith("/" + SCHEMA.name)
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA))
    del meta["network_data_format"]["outputs"]["pred"]["value_range"]  # the schema is really applied
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="value_range"):
        verify_metadata(meta_file=str(broken), filepath=str(SCHEMA))


def test_version_has_a_changelog_entry_and_a_display_name() -> None:
    """The Zoo's verify_version_changes (less the model_info.json lookup of a Zoo checkout)."""
    meta = _metadata()
    assert meta["version"] in meta["changelog"] and meta["changelog"][meta["version"]]
    assert meta["name"].lower().replace(" ", "_") == BUNDLE  # display name <-> the Zoo folder name
    assert "placeholder" not in meta["authors"].lower() and "bundle team" not in meta["authors"].lower()
    assert any("arXiv:2606.18749" in ref for ref in meta["references"])
    assert meta["eval_metrics"] and all(isinstance(v, (int, float)) for v in meta["eval_metrics"].values())


def test_network_def_takes_and_returns_what_the_metadata_says() -> None:
    """The Zoo's verify_data_shape: MONAI's verify_net_in_out with the bundle's network_def."""
    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=str(CONFIG), bundle_root=str(ROOT))
    fmt = _metadata()["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    net = _network_def()
    low, high = image["value_range"]
    encoder = net.encoder
    assert low == pytest.approx((0 - encoder.mean[0]) / encoder.std[0]) and high == pytest.approx(
        (1 - encoder.mean[0]) / encoder.std[0]
    )
    out = net(torch.rand(2, image["num_channels"], *image["spatial_shape"]))
    assert tuple(out.shape) == (2, pred["num_channels"], *pred["spatial_shape"]) and out.dtype == torch.float32
    post = fmt["post_processed_outputs"]["pred"]
    assert post["num_channels"] == 1 and post["value_range"] == []  # >= 0, no fixed upper bound


def test_model_pt_is_reproducible_listed_and_loaded_by_network_def(model_pt: tuple[Path, str]) -> None:
    path, sha = model_pt
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    listing = ConfigParser.load_config_file(str(ROOT / "large_files.yml"))["large_files"]
    assert [e["path"] for e in listing] == ["models/model.pt"]  # no third-party checkpoint in a release
    assert listing[0]["hash_type"] == "sha256" and re.fullmatch(r"[0-9a-f]{64}", listing[0]["hash_val"])
    if torch.__version__.split("+")[0] == _metadata()["pytorch_version"]:
        assert sha == listing[0]["hash_val"], "python -m scripts export_model no longer writes the listed file"
    net = _network_def()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    assert all(torch.equal(state[k], v) for k, v in _network_def().state_dict().items())


def test_torchscript_export_by_trace(model_pt: tuple[Path, str], tmp_path: Path) -> None:
    """ckpt_export with use_trace gives a TorchScript module that computes network_def; the scripted
    export (the Zoo's default) fails inside the efficientnet package: the documented exclusion."""
    ts = tmp_path / "model.ts"
    common = dict(
        net_id="network_def",
        ckpt_file=str(model_pt[0]),
        meta_file=str(META),
        config_file=str(CONFIG),
        bundle_root=str(ROOT),
    )
    with pytest.warns(torch.jit.TracerWarning):
        ckpt_export(filepath=str(ts), use_trace=True, input_shape=[1, 3, 112, 112], **common)
    module = torch.jit.load(str(ts))
    slices = torch.rand(2, 3, 112, 112)
    torch.testing.assert_close(module(slices), _network_def()(slices))
    with pytest.raises(Exception):  # noqa: B017 (torch.jit raises several error types)
        ckpt_export(filepath=str(tmp_path / "scripted.ts"), **common)


def _requirements() -> dict[str, Requirement]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]
    return {r.name.lower(): r for r in reqs}


def test_required_packages_pin_every_runtime_requirement() -> None:
    """The Zoo installs monai, torch, numpy and required_packages_version exactly as pinned: every
    requirement of requirements.txt is pinned there, within its range. (The pins are chosen to install
    on Python 3.10, the Zoo's CI Python; docs/README.md has the command that checks it.)"""
    meta = _metadata()
    pins = {k.lower(): v for k, v in meta["required_packages_version"].items()}
    pins.update(torch=meta["pytorch_version"], monai=meta["monai_version"], numpy=meta["numpy_version"])
    for name, req in _requirements().items():
        assert name in pins, name
        assert Version(pins[name]) in req.specifier, (name, pins[name], str(req.specifier))
    assert Version(meta["numpy_version"]) < Version("2.3")  # numpy 2.3 dropped Python 3.10


TEXT = {".py", ".json", ".md", ".yml", ".yaml", ".txt", ".toml", ".conf", ".cfg", ""}
OUTSIDE = re.compile(r"\.\./shared|/work/|ARCHITECTURE\.md|\bissues? ?#?\d+", re.IGNORECASE)


def test_nothing_in_the_bundle_points_outside_it() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False).stdout
    paths = [ROOT / f for f in files.split()] or [p for p in ROOT.rglob("*") if ".git" not in p.parts]
    found = []
    for path in paths:
        if path.is_file() and path.suffix in TEXT and path != Path(__file__):
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if OUTSIDE.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


@pytest.mark.skipif(not os.environ.get("CS3F_ZOO_DIR"), reason="no Model Zoo checkout: set CS3F_ZOO_DIR")
def test_the_zoos_own_ci_steps_pass_in_a_zoo_checkout() -> None:
    """`.ci/zoo_verify` in the checkout CS3F_ZOO_DIR names (a copy of Project-MONAI/model-zoo)."""
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "zoo_verify"), os.environ["CS3F_ZOO_DIR"], "--no-unit-tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_inference_config_is_the_size_of_a_zoo_bundles() -> None:
    """configs/inference.json reads like the Zoo's inference configs (spleen_ct_segmentation,
    brats_mri_segmentation: 150-170 lines, 24-27 top-level keys): at most 35 top-level keys and 200 lines
    as the Zoo's hooks format it, parameters inside the components that use them, no key only to be
    rejected, and no expression that re-checks every key."""
    text = CONFIG.read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=4, ensure_ascii=False) + "\n"  # as pretty-format-json writes it
    assert len(config) <= 35, sorted(config)
    assert len(text.splitlines()) <= 200
    assert not {"options", "reference_bank", "chunk_size", "n_references"} & set(config)
    keys = list(config)
    order = ["imports", "bundle_root", "dataset_dir", "output_dir", "loading", "intensity", "finishing"]
    order += ["dataset", "dataloader", "network_def", "inferer", "postprocessing", "handlers", "evaluator"]
    assert [keys.index(k) for k in order] == sorted(keys.index(k) for k in order)  # top to bottom
    assert keys[-2:] == ["initialize", "run"]
