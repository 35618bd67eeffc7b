"""What identifies a run's tokens: the key of the token cache and the identity a reference bank checks.

The preprocessing part is read off the transform objects the data loader applies (:func:`describe_transform`),
never from a hand-kept copy of their parameters, so any change of the preprocessing changes the identity.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, LoadImage

__all__ = ["SCORING_ONLY", "describe_transform", "encoder_identity", "preprocessing_identity", "token_identity"]

#: inferer parameters that change scores but not tokens: a run changing only these reuses the cache
SCORING_ONLY = ("rho", "k_rule", "variant", "L", "references", "edge", "smooth_mm", "subject_score", "score_precision")

# Nested objects deeper than this are named by their class only (transforms nest one or two levels).
_MAX_DEPTH = 4
# Arrays longer than this are identified by a digest instead of their values.
_MAX_ELEMENTS = 64


def _qualname(obj: Any) -> str:
    """``module.QualifiedName`` of a class or routine, or of an instance's class."""
    kind = obj if isinstance(obj, type) or inspect.isroutine(obj) else type(obj)
    return f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', type(kind).__name__)}"


def _array(value: np.ndarray | np.generic | torch.Tensor) -> Any:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.size <= _MAX_ELEMENTS:
        return array.tolist()
    digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    return {"shape": list(array.shape), "dtype": str(array.dtype), "sha256": digest}


def describe_transform(value: Any, depth: int = 0) -> Any:
    """The parameters of a transform (or of any value it holds) as plain JSON data.

    A ``Compose`` becomes ``{"<position>:<class name>": parameters, **options}``; any other object
    ``{"_target_": module.Class, attribute: value, ...}``. Large arrays give a digest; classes, functions
    and networks their qualified name only (a lambda's body is not seen).
    """
    if isinstance(value, Enum):
        value = value.value
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.dtype | np.dtype):
        return str(value)
    if isinstance(value, np.ndarray | np.generic | torch.Tensor):
        return _array(value)
    if isinstance(value, Mapping):
        return {str(k): describe_transform(v, depth) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [describe_transform(v, depth) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((describe_transform(v, depth) for v in value), key=repr)
    if depth >= _MAX_DEPTH or isinstance(value, type | torch.nn.Module) or inspect.isroutine(value):
        return _qualname(value)
    if isinstance(value, Compose):
        # a transform that says it changes nothing (``is_noop``, e.g. ``register`` none) is no part of it
        kept = [t for t in value.transforms if not getattr(t, "is_noop", False)]
        steps = {f"{i}:{type(t).__name__}": describe_transform(t, depth + 1) for i, t in enumerate(kept)}
        options = {k: describe_transform(v, depth + 1) for k, v in sorted(vars(value).items()) if k != "transforms"}
        return {**steps, **options}  # the Compose's own options (map_items, lazy, ...) matter too
    if isinstance(value, functools.partial):
        return {
            "_target_": _qualname(value.func),
            "args": describe_transform(value.args, depth + 1),
            **{k: describe_transform(v, depth + 1) for k, v in sorted(value.keywords.items())},
        }
    if not hasattr(value, "__dict__"):
        return _qualname(value)
    attributes = sorted(vars(value).items())
    if isinstance(value, LoadImage) and value.auto_select:
        # The readers MONAI registered depend on the optional packages installed (ITK, PIL, ...), not on
        # the configuration: a cache or bank must not change identity from one machine to the next.
        attributes = [(k, v) for k, v in attributes if k != "readers"]
    return {"_target_": _qualname(value), **{k: describe_transform(v, depth + 1) for k, v in attributes}}


def preprocessing_identity(transform: Callable | None, split: Callable | None = None) -> dict:
    """The preprocessing's part of a token identity.

    Args:
        transform: the transform chain applied to every loaded item (the dataset's ``transform``).
        split: the transform that cuts a preprocessed volume into independently scored parts, if any
            (e.g. the lung crops of :class:`scripts.engine.lung_parts.LungParts`).
    """
    identity = {"transforms": describe_transform(transform)}
    if split is not None:
        identity["split"] = describe_transform(split)
    return identity


def encoder_identity(network: torch.nn.Module) -> dict | str:
    """The encoder's own identity (name, layers, input size, weights' sha256) or, lacking one, its class."""
    return network.identity() if hasattr(network, "identity") else type(network).__name__


def token_identity(describe: Mapping, network: torch.nn.Module, preprocessing: Mapping) -> dict:
    """Everything that shapes tokens: the key of :class:`scripts.storage.cache.TokenCache`.

    Args:
        describe: :meth:`scripts.inferer.CS3FInferer.describe` (its scoring-only entries are left out).
        network: the encoder.
        preprocessing: :func:`preprocessing_identity`.
    """
    return {
        "inferer": {k: v for k, v in describe.items() if k not in SCORING_ONLY},
        "encoder": encoder_identity(network),
        "preprocessing": dict(preprocessing),
    }
