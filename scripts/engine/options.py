"""Command-line overrides checked against the config files: a key that is neither a config id nor an
argument of a component (``--rhoo 0.2``) stops the run, naming the closest known key."""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from scripts.errors import CS3FInputError, install_excepthook

__all__ = ["check_overrides", "config_ids", "unknown_key_error"]

RUN_ARGUMENTS = set(
    "config_file meta_file logging_file tracking args_file run_id init_id final_id workflow_type workflow_name "
    "properties_path".split()
)  # the arguments of ``monai.bundle run`` itself


def _target_arguments(target: object) -> list[str]:
    """The arguments of a component's ``_target_`` (a dotted path or a MONAI class name)."""
    from pydoc import locate

    from monai.bundle.config_item import ComponentLocator

    try:
        obj = locate(target) if "." in str(target) else None
        if obj is None:
            module = ComponentLocator().get_component_module_name(str(target))
            module = module[0] if isinstance(module, list) else module
            obj = getattr(importlib.import_module(module), str(target)) if module else None
        params = inspect.signature(obj).parameters.values() if obj is not None else []
        # a target taking **kwargs accepts any argument: "*" stands for them
        return [p.name if p.kind is not p.VAR_KEYWORD else "*" for p in params]
    except Exception:  # noqa: BLE001 - an unknown target only means no extra known ids
        return []


def config_ids(config: Any, prefix: str = "") -> Iterator[str]:
    """Every id of ``config`` (``a``, ``a#b``, ``a#0#c``, ...) and the arguments of its components."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        key = str(key).lstrip("+")
        full = f"{prefix}#{key}" if prefix else key
        yield full
        yield from config_ids(value, full)
    if isinstance(config, dict) and "_target_" in config:
        yield from (f"{prefix}#{a}" if prefix else a for a in _target_arguments(config["_target_"]))


def unknown_key_error(key: str, known: Sequence[str]) -> CS3FInputError:
    """One line naming ``key`` and the closest known id (an id ending with ``#key`` first: a key that
    moved into its component)."""
    moved = sorted(k for k in known if k.endswith("#" + key))
    close = moved[:1] or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f": did you mean --{close[0]}?" if close else " (see configs/inference.json)"
    return CS3FInputError(f"unknown config key --{key}{hint}")


def _argv_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(config files, override keys)`` of a ``python -m monai.bundle run`` command line."""
    files: list[str] = []
    keys = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        key = arg[2:].split("=", 1)[0]
        if key == "config_file" and i + 1 < len(argv):
            value = (arg.split("=", 1)[1] if "=" in arg else argv[i + 1]).strip()
            files = [str(f) for f in ast.literal_eval(value)] if value.startswith("[") else [value]
        elif key not in RUN_ARGUMENTS:
            keys.append(key)
    return files, keys


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """Install the one-line error hook, then stop on a ``monai.bundle run`` command-line key that no config
    file defines (an in-process ``ConfigWorkflow`` passes its overrides as arguments, not on ``sys.argv``).
    SIGINT/SIGTERM become one line only in a ``monai.bundle run`` process: an in-process run (a notebook, a
    service) leaves its host's signal handlers as they were."""
    argv = list(sys.argv if argv is None else argv)
    command = bool(argv) and argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py") and "run" in argv[1:2]
    install_excepthook(signals=command)
    if not command:
        return
    files, keys = _argv_overrides(argv[2:])
    if not files or not keys:
        return
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(files)
    known = set(config_ids(parser.get()))
    for key in keys:
        parents = key.split("#")[:-1]
        if key not in known and not any("#".join(parents[:i]) + "#*" in known for i in range(1, len(parents) + 1)):
            raise unknown_key_error(key, sorted(k for k in known if not k.endswith("*")))
