"""Affine registration to a template as an invertible MONAI transform: ``Invertd`` brings the map back onto
the input's grid. :class:`Registerd` adds the template mask, a cache of the affine and the quality checks."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, SpatialResample, Transform
from monai.utils import TransformBackends
from scipy import ndimage
from scripts.digest import file_digest
from scripts.errors import CS3FInputError
from scripts.transforms.affine_registration import (
    REGISTER_CHOICES,
    Template,
    estimate_affine,
    foreground,
    load_template,
    registration_quality,
)

__all__ = ["REGISTER_CHOICES", "Register", "RegistrationCache", "Registerd", "Template", "load_template"]

REGISTRATION_VERSION = 2  # part of every registration's cache key


class Register(InvertibleTransform, Transform):
    """Resample a volume onto a template's grid through an affine registration (:func:`estimate_affine`).

    Args:
        template: a ``register`` spelling (``"mni152"``, ``"template:PATH[,MASK]"``) or a :class:`Template`.
        iterations, sampling, seed, mask_margin_mm: see :func:`estimate_affine`.
        mode: interpolation of ``__call__`` (``"bilinear"`` or ``"nearest"``).

    Call: ``(img [C, X, Y, Z], transform=None, mode=None)``; ``transform`` (template world -> image world
    ``[4, 4]``) defaults to :meth:`fit` of ``img``.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        template: str | Template = "mni152",
        iterations: int = 100,
        sampling: float = 0.2,
        seed: int = 0,
        mask_margin_mm: float = 6.0,
        mode: str = "bilinear",
    ) -> None:
        self.template = template if isinstance(template, Template) else load_template(template)
        if self.template is None:
            raise CS3FInputError("Register needs a template (register none means no registration)")
        self.iterations, self.sampling, self.seed = int(iterations), float(sampling), int(seed)
        self.mask_margin_mm, self.mode = float(mask_margin_mm), mode

    @staticmethod
    def _affine(img: torch.Tensor) -> np.ndarray:
        return np.asarray(img.affine if isinstance(img, MetaTensor) else torch.eye(4), np.float64)

    def fit(self, img: torch.Tensor) -> tuple[np.ndarray, float]:
        """``(T, final metric)`` for ``img [C, X, Y, Z]`` (its first channel)."""
        data = torch.as_tensor(img).detach().cpu().float().numpy()
        return estimate_affine(
            data[0], self._affine(img), self.template, self.iterations, self.sampling, self.seed, self.mask_margin_mm
        )

    @staticmethod
    def _resample(img: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray, shape, mode: str) -> torch.Tensor:
        """``img``'s voxels placed at ``src_affine``, resampled onto ``(shape, dst_affine)``."""
        data = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        dtype = data.dtype
        src = MetaTensor(data.float(), affine=torch.as_tensor(src_affine, dtype=torch.float64))
        out = SpatialResample(mode=mode, padding_mode="zeros", align_corners=True)(
            src, dst_affine=torch.as_tensor(dst_affine, dtype=torch.float64), spatial_size=tuple(int(s) for s in shape)
        )
        out = out.as_tensor()
        return out.round().to(dtype) if not dtype.is_floating_point else out.to(dtype)

    @staticmethod
    def _like(out: torch.Tensor, img: torch.Tensor, affine: np.ndarray) -> MetaTensor:
        """``out`` with ``img``'s metadata and transform history, and ``affine``."""
        meta = dict(img.meta) if isinstance(img, MetaTensor) else {}
        ops = list(img.applied_operations) if isinstance(img, MetaTensor) else []
        result = MetaTensor(out, meta=meta, applied_operations=ops)
        result.affine = torch.as_tensor(affine, dtype=torch.float64)
        return result

    def __call__(self, img: torch.Tensor, transform: np.ndarray | None = None, mode: str | None = None) -> MetaTensor:
        if transform is None:
            transform, _ = self.fit(img)
        transform = np.asarray(transform, np.float64)
        original = self._affine(img)
        grid = (self.template.affine, self.template.image.shape)
        out = self._resample(img, np.linalg.inv(transform) @ original, *grid, mode or self.mode)
        result = self._like(out, img, self.template.affine)
        self.push_transform(
            result,
            orig_size=tuple(int(s) for s in img.shape[1:]),
            extra_info={"src_affine": original.tolist(), "registration": transform.tolist()},
        )
        return result

    def inverse(self, data: torch.Tensor) -> MetaTensor:
        info = self.pop_transform(data)
        extra = info["extra_info"]
        transform = np.asarray(extra["registration"], np.float64)
        original = np.asarray(extra["src_affine"], np.float64)
        out = self._resample(data, transform @ self._affine(data), original, info["orig_size"], "bilinear")
        return self._like(out, data, original)


class RegistrationCache:
    """The registrations of a run, one JSON file per image in ``folder`` (``None``: no cache); slotted, so the
    token identity names it by its class only, not by where it is."""

    __slots__ = ("folder",)

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) / "registration" if folder is not None else None

    def load(self, name: str, key: str) -> dict | None:
        path = self.folder / f"{name}.json" if self.folder is not None else None
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return entry if entry.get("key") == key else None

    def save(self, name: str, entry: dict) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=self.folder)
        with os.fdopen(fd, "w") as fh:
            json.dump(entry, fh)
        os.replace(tmp, self.folder / f"{name}.json")


def _file_of(img: torch.Tensor) -> str:
    return str(img.meta.get("filename_or_obj", "")) if isinstance(img, MetaTensor) else ""


class Registerd(MapTransform, InvertibleTransform):
    """Dictionary form of :class:`Register`: register ``image_key``, resample every key (``mask_key``
    nearest), give volumes without a mask the template's, refuse a failed registration, and record it in
    each volume's ``meta["registration"]`` (a JSON string).

    Args:
        register: ``"none"`` (nothing happens), ``"mni152"``, ``"template:PATH[,MASK]"`` or a :class:`Template`.
        mask_key: the foreground mask: resampled if given, else the template's mask dilated by
            ``mask_margin_mm`` and restricted to the volume's own foreground.
        cache_dir: folder of the token cache; registrations are kept in its ``registration/`` sub-folder.
        iterations, sampling, seed, metric_margin_mm: see :class:`Register` (``mask_margin_mm`` there).
        min_coverage: smallest fraction of the template mask on the volume's own foreground.
        max_metric: largest (worst) Mattes mutual information value over the dilated template mask.
        max_mirror_gain: largest improvement of that value against the left-right mirrored template.
        scale_range: allowed range of the affine's singular values.
    """

    backend = Register.backend

    def __init__(
        self,
        keys: KeysCollection = ("image", "mask"),
        register: str | Template = "none",
        image_key: str = "image",
        mask_key: str = "mask",
        mask_margin_mm: float = 2.0,
        cache_dir: str | Path | None = None,
        iterations: int = 100,
        sampling: float = 0.2,
        seed: int = 0,
        metric_margin_mm: float = 6.0,
        min_coverage: float = 0.9,
        max_metric: float = -0.5,
        max_mirror_gain: float = 0.02,
        scale_range: tuple[float, float] = (0.67, 1.5),
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        template = register if isinstance(register, Template) else load_template(register)
        self.register = None if template is None else Register(template, iterations, sampling, seed, metric_margin_mm)
        self.image_key, self.mask_key = image_key, mask_key
        self.mask_margin_mm = float(mask_margin_mm)
        self.cache = RegistrationCache(cache_dir)
        self.min_coverage, self.max_metric = float(min_coverage), float(max_metric)
        self.max_mirror_gain = float(max_mirror_gain)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.version = REGISTRATION_VERSION

    @property
    def is_noop(self) -> bool:
        """``register`` none: the transform changes nothing (and is no part of the token identity)."""
        return self.register is None

    def _identity_key(self, source: str) -> str:
        r = self.register
        blob = json.dumps(
            [self.version, r.template.digest(), r.iterations, r.sampling, r.seed, r.mask_margin_mm, source]
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _estimate(self, img: torch.Tensor) -> dict:
        """The registration of ``img``: from the cache, or estimated (and cached)."""
        source = _file_of(img)
        on_disk = bool(source) and Path(source).is_file()  # in-memory volumes are not cached
        name = Path(source).name.split(".nii")[0] if on_disk else ""
        key = self._identity_key(file_digest([source]) if on_disk else "")
        entry = self.cache.load(name, key) if name else None
        if entry is not None:
            return {**entry, "cached": True}
        start = time.process_time()
        transform, final = self.register.fit(img)
        seconds = time.process_time() - start
        moved = self.register(img, transform).as_tensor()[0].float().numpy()
        quality = registration_quality(moved, self.register.template, transform, self.register.mask_margin_mm)
        entry = {
            "key": key,
            "template": self.register.template.name,
            "transform": np.round(transform, 8).tolist(),
            "final_metric": round(final, 5),
            **quality,
            "cpu_seconds": round(seconds, 2),
        }
        if name:
            self.cache.save(name, entry)
        return {**entry, "cached": False}

    def check(self, entry: dict, source: str) -> None:
        """Raise :class:`CS3FInputError` naming ``source`` if the registration ``entry`` failed."""
        problems = []
        if entry["coverage"] < self.min_coverage:
            problems.append(
                f"only {entry['coverage']:.0%} of the template's brain mask lies on the image's foreground "
                f"(need {self.min_coverage:.0%}: a cropped head or another body part?)"
            )
        if entry["metric"] > self.max_metric:
            problems.append(
                f"mutual information {entry['metric']:.3f} is weaker than {self.max_metric} "
                f"(not a brain like the template?)"
            )
        if entry["mirror_gain"] > self.max_mirror_gain:
            problems.append(
                f"the left-right mirrored template fits better by {entry['mirror_gain']:.3f} (left and right swapped?)"
            )
        low, high = self.scale_range
        if min(entry["scales"]) < low or max(entry["scales"]) > high:
            problems.append(f"the affine scales by {entry['scales']} (allowed {low}-{high})")
        if problems:
            raise CS3FInputError(
                f"{source or 'a volume'}: registration to the {entry['template']} template failed: "
                f"{'; '.join(problems)}"
            )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.register is None:
            return d
        img = d[self.image_key]
        source = _file_of(img)
        entry = self._estimate(img)
        self.check(entry, source)
        transform = np.asarray(entry["transform"], np.float64)
        record = json.dumps({k: v for k, v in entry.items() if k != "key"})
        for key in self.key_iterator(d):
            mode = "nearest" if key == self.mask_key else "bilinear"
            d[key] = self.register(d[key], transform, mode=mode)
            d[key].meta["registration"] = record
        if d.get(self.mask_key) is None:
            d[self.mask_key] = self._template_mask(d[self.image_key])
        return d

    @property
    def makes_masks(self) -> bool:
        """Whether items without a mask get the template's (whenever a template is set)."""
        return self.register is not None

    def _template_mask(self, moved: MetaTensor) -> MetaTensor:
        """The dilated template mask on the registered image's own foreground, recorded like the image."""
        template = self.register.template
        steps = round(self.mask_margin_mm / template.spacing)
        mask = ndimage.binary_dilation(template.mask, iterations=steps) if steps > 0 else template.mask
        mask = mask & foreground(moved.as_tensor()[0].float().numpy())
        out = MetaTensor(
            torch.from_numpy(mask[None].astype(np.float32)),
            meta=dict(moved.meta),
            applied_operations=[dict(op) for op in moved.applied_operations],
        )
        out.affine = moved.affine.clone()
        return out

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.register is None:
            return d
        for key in self.key_iterator(d):
            d[key] = self.register.inverse(d[key])
        return d
