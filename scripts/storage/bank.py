"""Reference token banks (format in docs/scaling.md): fp16 ``[B, N, d]`` token and bool ``[B, N]`` validity
``.npy`` arrays per part and key, written volume by volume and memory-mapped when read, and ``bank.json``
(written last) with everything that shapes tokens and each array's sha256."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scripts.digest import file_digest
from scripts.errors import CS3FInputError, one_line
from scripts.storage.atomic import atomic_write, atomic_write_json, commit, jsonable, temp_path

__all__ = ["BANK_FORMAT", "BANK_VERSION", "MANIFEST", "BankWriter", "TokenBank", "bank_identity"]

BANK_FORMAT = "cs3f-token-bank"
BANK_VERSION = 2  # 2: arrays with sha256, depth_phases in the identity
MANIFEST = "bank.json"
#: identity fields compared whatever the variant (``q_fine`` only when the run needs fine tokens)
COMPARED = ("encoder", "layers", "axes", "q", "depth_phases", "d", "seed", "delta", "preprocessing")


def bank_identity(describe: Mapping, encoder: Mapping | str, preprocessing: Mapping) -> dict:
    """What a bank and a run must agree on (everything that shapes tokens), from the inferer's ``describe()``,
    the encoder's identity (or class name) and the preprocessing's parameters."""
    layers = encoder.get("layers") if isinstance(encoder, Mapping) else None
    return jsonable(
        {
            "encoder": encoder,
            "layers": layers,
            "axes": describe["axes"],
            "q": describe["q"],
            "depth_phases": describe.get("depth_phases", 1),
            "q_fine": describe.get("q_fine"),
            "variant": describe.get("variant", "C"),
            "d": describe["d"],
            "seed": describe["seed"],
            "delta": describe["delta"],
            "preprocessing": dict(preprocessing),
        }
    )


#: fields of each array spec of the manifest besides its ``grid``
_SPEC_FIELDS = (("d", int), ("tokens", str), ("valid", str), ("tokens_sha256", str), ("valid_sha256", str))
_MAX_DIFFS = 8  # differences named in a mismatch error; the rest are counted


def _differences(run, bank, prefix: str) -> list[str]:  # noqa: ANN001 - JSON values
    """``"<field> (bank <value>, run <value>)"`` for each differing field, recursing where both are dicts."""
    if isinstance(run, dict) and isinstance(bank, dict):
        out = []
        for key in sorted(set(run) | set(bank)):
            out += _differences(run.get(key), bank.get(key), f"{prefix}.{key}")
        return out
    return [] if run == bank else [f"{prefix} (bank {_short(bank)}, run {_short(run)})"]


def _short(value) -> str:  # noqa: ANN001
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class BankWriter:
    """Writes a token bank volume by volume into ``capacity``-row temporary memmaps in ``folder`` (created;
    an existing manifest removed first); :meth:`finish` renames them into place, :meth:`abort` removes them."""

    def __init__(self, folder: str | Path, capacity: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)
        self.capacity = int(capacity)
        self.names: list[str] = []
        self.spatial: dict[str, list[int]] = {}
        self.arrays: dict[tuple[str, str], dict] = {}  # (part, key) -> manifest spec
        self._open: dict[tuple[str, str, str], tuple[np.memmap, Path]] = {}  # + "tokens"/"valid"

    def add(self, name: str, part: str, tokens) -> None:  # noqa: ANN001 - scripts.inferer.VolumeTokens
        """Write one part of one volume (parts of a volume are added one after the other)."""
        if not self.names or self.names[-1] != name:
            if name in self.names:
                raise ValueError(f"{name} was already added to the bank")
            if len(self.names) == self.capacity:
                raise ValueError(f"the bank was opened for {self.capacity} volumes")
            self.names.append(name)
        row = len(self.names) - 1
        self.spatial.setdefault(part, list(tokens.spatial_shape))
        for key, grid in tokens.grids.items():
            n_tokens, d = grid.valid.numel(), grid.tokens.shape[-1]
            spec = self.arrays.get((part, key))
            if spec is None:
                spec = self._open_arrays(part, key, list(grid.shape), n_tokens, d)
            if list(grid.shape) != spec["grid"] or d != spec["d"]:
                raise ValueError(f"{name}: {key} grid {tuple(grid.shape)} x {d} differs from the bank's {spec['grid']}")
            tokens_rows, valid_rows = (self._open[(part, key, what)][0] for what in ("tokens", "valid"))
            tokens_rows[row] = grid.tokens.detach().reshape(n_tokens, d).to("cpu", torch.float16).numpy()
            valid_rows[row] = grid.valid.detach().reshape(n_tokens).cpu().numpy()

    def _open_arrays(self, part: str, key: str, grid: list[int], n_tokens: int, d: int) -> dict:
        """The manifest spec of a new ``(part, key)``, its two arrays opened as temporary memmaps."""
        stem = f"{'tokens-' + part if part else 'tokens'}/{key.replace('/', '_')}"
        spec = {"grid": grid, "d": d, "tokens": f"{stem}.tokens.npy", "valid": f"{stem}.valid.npy"}
        for what, dtype, shape in (("tokens", np.float16, (n_tokens, d)), ("valid", bool, (n_tokens,))):
            tmp = temp_path(self.folder / spec[what])
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(self.capacity, *shape))
            self._open[(part, key, what)] = (array, tmp)
        self.arrays[(part, key)] = spec
        return spec

    def abort(self) -> None:
        """Drop the arrays written so far."""
        for _, tmp in self._open.values():
            tmp.unlink(missing_ok=True)  # the memmaps go with the dict entries
        self._open.clear()

    def finish(
        self,
        identity: Mapping,
        sources: Mapping[str, str] | Sequence[str] = (),
        grids: Mapping[str, tuple] | None = None,
        info: Mapping | None = None,
        subjects: Mapping[str, tuple[str, str]] | None = None,
    ) -> Path:
        """Close the arrays (truncated to the volumes added) and write the manifest; its path.

        Args:
            identity: :func:`bank_identity` of the run that made the tokens.
            sources: sha256 of each volume's source files, by name or in order (``""``: unknown).
            grids: ``{part: (spatial shape, affine [4, 4])}`` of the preprocessed volumes.
            info: extra manifest entries.
            subjects: ``{name: (subject, sha256 of its voxels)}``.
        """
        b = len(self.names)
        if b == 0:
            raise ValueError("no volume was added to the bank")
        parts: dict[str, dict] = {}
        for (part, key), spec in self.arrays.items():
            for what in ("tokens", "valid"):
                array, tmp = self._open.pop((part, key, what))
                array.flush()
                if b < self.capacity:  # volumes were skipped: copy the first b rows to a smaller file
                    atomic_write(self.folder / spec[what], lambda small, a=array: _copy_rows(a, b, small))
                    del array
                    tmp.unlink()
                else:
                    del array
                    commit(tmp, self.folder / spec[what])
                spec[f"{what}_sha256"] = file_digest([self.folder / spec[what]])
            entry = parts.setdefault(part, {"keys": {}, "spatial_shape": self.spatial[part]})
            entry["keys"][key] = spec
        for part, entry in parts.items():
            if grids and part in grids:
                shape, affine = grids[part]
                entry["grid"] = {"shape": list(shape), "affine": torch.as_tensor(affine).double().tolist()}
        by_name = dict(sources) if isinstance(sources, Mapping) else dict(zip(self.names, sources, strict=False))
        manifest = {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token_dtype": "float16",
            "identity": jsonable(dict(identity)),
            "n_volumes": b,
            "volumes": list(self.names),
            "sources": [str(by_name.get(n, "")) for n in self.names],
            "subjects": [list((subjects or {}).get(n, ("", ""))) for n in self.names],
            "parts": parts,
            **jsonable(dict(info or {})),
        }
        return atomic_write_json(self.folder / MANIFEST, manifest, indent=1)


def _copy_rows(array: np.ndarray, rows: int, path: Path) -> None:
    """Write the first ``rows`` rows of ``array`` as a ``.npy`` file at ``path``, 64 rows at a time."""
    small = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=(rows, *array.shape[1:]))
    for start in range(0, rows, 64):
        small[start : start + 64] = array[start : min(start + 64, rows)]
    small.flush()
    del small


class TokenBank:
    """A saved token bank, opened read-only once its manifest and arrays (shape, size, sha256) are checked;
    :class:`CS3FInputError` naming the file and key otherwise."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = path = self.folder / MANIFEST
        if not path.is_file():
            raise self._error(
                f"{self.folder} is not a token bank (no {MANIFEST}); build one with configs/build_bank.json"
            )
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CS3FInputError(f"cannot read the reference bank manifest: {one_line(err)} ({path})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != BANK_FORMAT:
            raise self._error("manifest is not a CS3F token bank manifest (format)")
        version = self._field(self.manifest, "version", int)
        if version != BANK_VERSION:
            fix = "update the bundle" if version > BANK_VERSION else "rebuild the bank with configs/build_bank.json"
            raise self._error(f"has format version {version}; this bundle reads version {BANK_VERSION} ({fix})")
        self._check_manifest()

    def _error(self, problem: str, file: Path | None = None) -> CS3FInputError:
        return CS3FInputError(f"reference bank {problem} ({file or self.path})")

    def _field(self, parent: Mapping, key: str, kind: type, where: str = ""):  # noqa: ANN202 - of type kind
        value = parent.get(key) if isinstance(parent, Mapping) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            name = f"{where}[{key!r}]" if where else repr(key)
            raise self._error(f"manifest has no valid {name} ({kind.__name__})")
        return value

    def _check_manifest(self) -> None:
        """Every manifest field this bundle reads, then each array it lists (:meth:`_check_array`)."""
        m = self.manifest
        self._field(m, "identity", dict)
        n = self._field(m, "n_volumes", int)
        for key in ("volumes", "sources", "subjects"):
            if len(self._field(m, key, list)) != n:
                raise self._error(f"manifest lists {len(m[key])} {key} but n_volumes is {n}")
        if not self._field(m, "parts", dict):
            raise self._error("manifest has no parts")
        for part, entry in m["parts"].items():
            where = f"parts[{part!r}]"
            if not self._field(entry, "keys", dict, where):
                raise self._error(f"manifest has no keys in {where}")
            for field in ("shape", "affine") if "grid" in entry else ():
                self._field(entry["grid"], field, list, f"{where}['grid']")
            for key, spec in entry["keys"].items():
                at = f"{where}['keys'][{key!r}]"
                if not all(isinstance(g, int) for g in self._field(spec, "grid", list, at)):
                    raise self._error(f"manifest has no valid {at}['grid'] (int)")
                for field, kind in _SPEC_FIELDS:
                    self._field(spec, field, kind, at)
                self._check_array(at, spec)

    def _check_array(self, where: str, spec: Mapping) -> None:
        rows, d = (self.manifest["n_volumes"], math.prod(spec["grid"])), spec["d"]
        for what, dtype, shape in (("tokens", np.float16, (*rows, d)), ("valid", np.bool_, rows)):
            file = self.folder / spec[what]
            if not file.is_file():
                raise self._error(f"is incomplete: {spec[what]} is missing ({where}[{what!r}])", file)
            try:
                with open(file, "rb") as f:
                    fmt = np.lib.format
                    header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                    got, fortran, got_dtype = header(f)
                    start = f.tell()
            except (OSError, ValueError) as err:
                raise self._error(f"array {spec[what]} is not a .npy file: {one_line(err)}", file) from None
            if tuple(got) != shape or got_dtype != np.dtype(dtype) or fortran:
                raise self._error(
                    f"array {spec[what]} holds {got_dtype} {tuple(got)} but the manifest says {np.dtype(dtype)} "
                    f"{shape} (n_volumes {rows[0]}, {where}['grid'] {spec['grid']}, d {d})",
                    file,
                )
            size, need = file.stat().st_size, start + math.prod(shape) * np.dtype(dtype).itemsize
            if size != need:
                raise self._error(f"array {spec[what]} has {size} bytes, its shape needs {need} (truncated?)", file)
            if file_digest([file]) != spec[f"{what}_sha256"]:
                raise self._error(
                    f"array {spec[what]} does not match {where}['{what}_sha256'] of the manifest: it changed after "
                    f"the bank was built (rebuild the bank)",
                    file,
                )

    @property
    def names(self) -> list[str]:
        return list(self.manifest["volumes"])

    @property
    def parts(self) -> dict[str, dict]:
        return dict(self.manifest["parts"])

    @property
    def identity(self) -> dict:
        return dict(self.manifest["identity"])

    def __len__(self) -> int:
        return len(self.manifest["volumes"])

    def same_subject(self, digest: str | None, subject: str, voxels: str) -> list[int]:
        """Bank indices that are the same scan (same source bytes or voxels) or the same named subject."""
        out = {
            i
            for i, (s, v) in enumerate(self.manifest["subjects"])
            if (subject and s == subject) or (voxels and v == voxels)
        }
        if (source := self.index_of_source(digest)) is not None:
            out.add(source)
        return sorted(out)

    def index_of_source(self, digest: str | None) -> int | None:
        """The bank index of the volume made from the same source bytes, if any."""
        if not digest:
            return None
        sources = self.manifest["sources"]
        return sources.index(digest) if digest in sources else None

    def grid(self, part: str) -> tuple[tuple[int, ...], torch.Tensor] | None:
        """``(shape, affine)`` of the preprocessed volumes of ``part``, if recorded."""
        if (entry := self.parts.get(part, {}).get("grid")) is None:
            return None
        return tuple(entry["shape"]), torch.tensor(entry["affine"], dtype=torch.float64)

    def references(self, part: str = "") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{key: (tokens [B, N, d] fp16, valid [B, N] bool)}`` of ``part``, memory-mapped read-only."""
        if part not in self.parts:
            raise self._error(f"has no part {part!r} (it has {list(self.parts)})")
        out = {}
        with warnings.catch_warnings():  # torch warns that the read-only memmap is not writable
            warnings.simplefilter("ignore", UserWarning)
            for key, spec in self.parts[part]["keys"].items():
                out[key] = tuple(
                    torch.from_numpy(np.load(self.folder / spec[w], mmap_mode="r")) for w in ("tokens", "valid")
                )
        return out

    def check(self, identity: Mapping) -> None:
        """Raise one :class:`CS3FInputError` naming every field where the run's :func:`bank_identity` differs
        from the bank's (``q_fine`` only for a run that needs fine tokens: variant F/MS)."""
        run, bank = jsonable(dict(identity)), self.identity
        fields = list(COMPARED)
        if run.get("variant", "C") != "C":
            if bank.get("q_fine") is None:
                raise self._error(
                    f"has no fine tokens (built with variant {bank.get('variant', 'C')!r}) but this run is "
                    f"variant {run['variant']!r}: build the bank with variant F or MS"
                )
            fields.append("q_fine")
        diffs = []
        for field in fields:
            diffs += _differences(run.get(field), bank.get(field), field)
        if len(diffs) > _MAX_DIFFS:
            diffs[_MAX_DIFFS:] = [f"and {len(diffs) - _MAX_DIFFS} more"]
        if diffs:
            raise self._error(
                f"was built with another configuration: {'; '.join(diffs)}. Score with the bank's settings "
                f"or rebuild the bank with these (configs/build_bank.json)"
            )
