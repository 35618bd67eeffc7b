"""The one atomic writer: every output honours the umask, appears whole or not at all, leaves no temp."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from scripts.digest import file_digest
from scripts.evaluation import plots, report
from scripts.storage.atomic import (
    AtomicNibabelWriter,
    atomic_write,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    jsonable,
    temp_path,
)
from scripts.storage.bank import BankWriter, TokenBank
from scripts.storage.cache import TokenCache
from scripts.tokens import TokenGrid, VolumeTokens


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _tokens(seed: int = 0) -> VolumeTokens:
    gen = torch.Generator().manual_seed(seed)
    grid = TokenGrid(torch.randn(2, 3, 3, 8, generator=gen), torch.rand(2, 3, 3, generator=gen) > 0.2)
    return VolumeTokens((16, 24, 24), {"axial/0": grid})


def _nifti(path: Path) -> None:
    writer = AtomicNibabelWriter(output_dtype=np.float32)
    writer.set_data_array(np.arange(64, dtype=np.float32).reshape(4, 4, 4), channel_dim=None)
    writer.set_metadata({"affine": np.eye(4), "original_affine": np.eye(4)}, resample=False)
    writer.write(path)


def _bank(folder: Path) -> None:
    writer = BankWriter(folder, capacity=3)  # one row short: finish() makes the truncated copy too
    writer.add("a", "", _tokens(0))
    writer.add("b", "", _tokens(1))
    writer.finish({"d": 8}, {"a": "x"})


# every writer of the bundle: (name, writes one or more files under the given folder)
WRITERS: dict[str, Callable[[Path], None]] = {
    "text": lambda d: atomic_write_text(d / "scores.csv", "image,score\na,1\n"),
    "json": lambda d: atomic_write_json(d / "run.json", {"a": 1}),
    "csv": lambda d: atomic_write_csv(d / "t.csv", [[1, 2]], header=["x", "y"]),
    "lesions_csv": lambda d: report._write_csv(d / "lesions.csv", [{"x": 1, "y": 2}], ["x", "y"]),
    "nifti_map": lambda d: _nifti(d / "v_anomaly.nii.gz"),
    "png": lambda d: plots._save(Figure(figsize=(1, 1)), d / "fig.png"),
    "token_cache": lambda d: TokenCache(d / "tokens", {"k": 1}).save("v", "src", _tokens()),
    "bank": _bank,
}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("name", list(WRITERS))
def test_every_writer_honours_the_umask_and_leaves_no_temp(name: str, mask: int, tmp_path: Path) -> None:
    with umask(mask):
        WRITERS[name](tmp_path)
        # what open() itself makes under this umask: the independent reference
        (tmp_path / "reference").touch()
    expected = stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    assert expected == 0o666 & ~mask
    written = [p for p in _files(tmp_path) if p.name != "reference"]
    assert written, name
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path.name, oct(path.stat().st_mode))
        assert not path.name.startswith("."), f"temporary file left behind: {path}"


def test_written_files_read_back(tmp_path: Path) -> None:
    for write in WRITERS.values():
        write(tmp_path)
    assert (tmp_path / "scores.csv").read_text() == "image,score\na,1\n"
    assert json.loads((tmp_path / "run.json").read_text()) == {"a": 1}
    assert (tmp_path / "t.csv").read_bytes() == b"x,y\r\n1,2\r\n"  # csv's own dialect, as before
    assert (tmp_path / "lesions.csv").read_bytes() == b"x,y\r\n1,2\r\n"
    amap = nib.load(tmp_path / "v_anomaly.nii.gz")
    assert np.array_equal(np.asarray(amap.dataobj), np.arange(64, dtype=np.float32).reshape(4, 4, 4))
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cached = TokenCache(tmp_path / "tokens", {"k": 1}).load("v", "src")
    assert cached is not None and torch.equal(cached.grids["axial/0"].tokens, _tokens().grids["axial/0"].tokens)
    bank = TokenBank(tmp_path)
    assert bank.names == ["a", "b"]
    tokens, _ = bank.references("")["axial/0"]
    assert tokens.shape == (2, 18, 8)  # truncated to the two volumes added
    assert torch.equal(tokens[1], _tokens(1).grids["axial/0"].tokens.reshape(18, 8).half())


class _BoomError(RuntimeError):
    pass


def _half_then_fail(tmp: Path) -> None:
    with open(tmp, "w") as f:
        f.write("half a fi")
    raise _BoomError


def test_failing_writer_leaves_no_target_and_no_temp(tmp_path: Path) -> None:
    with pytest.raises(_BoomError):
        atomic_write(tmp_path / "out.txt", _half_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_failing_writer_keeps_the_previous_file(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "out.txt", "complete")
    with pytest.raises(_BoomError):
        atomic_write(tmp_path / "out.txt", _half_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    assert (tmp_path / "out.txt").read_text() == "complete"


def test_interrupted_writer_is_cleaned_up(tmp_path: Path) -> None:
    def interrupted(tmp: Path) -> None:
        tmp.write_text("partial")
        raise KeyboardInterrupt

    atomic_write_text(tmp_path / "a.txt", "x")  # a normal write first
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "b.txt", interrupted)
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failing_library_writers_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def torch_save_half(obj, path) -> None:  # noqa: ANN001
        Path(path).write_bytes(b"PK\x03\x04 half")
        raise _BoomError

    monkeypatch.setattr(torch, "save", torch_save_half)
    with pytest.raises(_BoomError):
        TokenCache(tmp_path / "tokens", {}).save("v", "src", _tokens())
    assert _files(tmp_path) == []

    def nib_save_half(img, filename) -> None:  # noqa: ANN001
        Path(filename).write_bytes(b"\x1f\x8b half")
        raise _BoomError

    monkeypatch.setattr(nib, "save", nib_save_half)
    with pytest.raises(_BoomError):
        _nifti(tmp_path / "v_anomaly.nii.gz")
    assert _files(tmp_path) == []


def test_aborted_bank_leaves_no_temp_and_no_manifest(tmp_path: Path) -> None:
    writer = BankWriter(tmp_path / "bank", capacity=4)
    writer.add("a", "", _tokens())
    assert any(p.name.startswith(".") for p in _files(tmp_path))  # the arrays being filled
    writer.abort()
    assert _files(tmp_path) == []


def test_temp_path_is_hidden_beside_the_target_and_keeps_the_extension_on_request(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "v_anomaly.nii.gz"
    plain, kept = temp_path(target), temp_path(target, keep_suffix=True)
    for tmp in (plain, kept):
        assert tmp.parent == target.parent and tmp.name.startswith(".v_anomaly") and tmp.is_file()
    assert kept.name.endswith(".nii.gz") and not plain.name.endswith(".gz")
    assert temp_path(tmp_path / "a.npy", keep_suffix=True).suffix == ".npy"
    assert len({temp_path(target) for _ in range(20)}) == 20  # never another writer's file


class _Colour(Enum):
    RED = "red"


def test_jsonable_gives_plain_json_that_round_trips() -> None:
    value = {
        1: (np.float32(1.5), np.int64(3), torch.tensor([1, 2])),
        "nan": float("nan"),
        "inf": -math.inf,
        "enum": _Colour.RED,
        "path": Path("/a/b"),
        "dtype": torch.float16,
        "nested": [{"t": (True, None)}],
    }
    out = jsonable(value)
    assert out == {
        "1": [1.5, 3, [1, 2]],
        "nan": None,
        "inf": None,
        "enum": "red",
        "path": "/a/b",
        "dtype": "torch.float16",
        "nested": [{"t": [True, None]}],
    }
    assert json.loads(json.dumps(out, allow_nan=False)) == out


def test_file_digest_is_the_sha256_of_the_concatenated_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(os.urandom(5000))
    b.write_bytes(b"second file")
    expected = hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()
    assert file_digest([a, b], chunk=1000) == expected == file_digest([a, b])
    assert file_digest([b, a]) != expected


def test_bank_mismatch_names_each_field_once_in_one_line(tmp_path: Path) -> None:
    from scripts.errors import CS3FInputError

    writer = BankWriter(tmp_path, capacity=1)
    writer.add("a", "", _tokens())
    built = {"d": 8, "seed": 0, "preprocessing": {"old_key": 1, "transforms": {"0:A": {"k": 1}}}}
    writer.finish(built)
    bank = TokenBank(tmp_path)
    bank.check(dict(built))  # the same identity passes
    run = {"d": 16, "seed": 0, "preprocessing": {"transforms": {"0:A": {"k": 2}, "1:B": {"x": 1, "y": 2}}}}
    with pytest.raises(CS3FInputError) as info:
        bank.check(run)
    message = str(info.value)
    assert "\n" not in message
    assert "d (bank 8, run 16)" in message and "seed" not in message
    assert "preprocessing.old_key (bank 1, run null)" in message
    assert "preprocessing.transforms.0:A.k (bank 1, run 2)" in message
    assert 'preprocessing.transforms.1:B (bank null, run {"x": 1, "y": 2})' in message  # once, not per leaf
    many = {"d": 8, "seed": 0, "preprocessing": {f"p{i}": i for i in range(12)}}
    with pytest.raises(CS3FInputError, match=r"preprocessing.p4 \(bank null, run 4\); and 6 more\."):
        bank.check(many)


# ---------------------------------------------------------------------------- cache and bank checksums
def _big_tokens() -> VolumeTokens:
    gen = torch.Generator().manual_seed(3)
    grid = TokenGrid(torch.randn(4, 8, 8, 64, generator=gen), torch.rand(4, 8, 8, generator=gen) > 0.2)
    return VolumeTokens((32, 32, 32), {"axial/0": grid})


def test_damaged_cache_entry_is_not_trusted_and_named_once(tmp_path: Path) -> None:
    """8 KB inside an entry overwritten by bytes from elsewhere in it: the file still loads (so only a
    checksum can tell), but the cache returns nothing and warns once, naming the file."""
    cache = TokenCache(tmp_path, {"k": 1})
    cache.save("v", "src", _big_tokens())
    path = cache.path("v")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8192] = data[middle // 4 : middle // 4 + 8192]
    path.write_bytes(bytes(data))
    damaged = torch.load(path, map_location="cpu", weights_only=True)  # still readable ...
    assert not torch.equal(damaged["grids"]["axial/0"][0], _big_tokens().grids["axial/0"].tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.load("v", "src") is None  # ... but not trusted
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and str(path) in messages[0] and messages[0].startswith("cs3f: "), messages


def test_cache_entry_of_another_format_or_key_is_silently_stale(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path, {"k": 1})
    cache.save("v", "src", _tokens())
    entry = torch.load(cache.path("v"), weights_only=True)
    torch.save({**entry, "format": 1}, cache.path("old"))  # an entry of the previous format
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load("old", "src") is None
        assert cache.load("v", "other source") is None
        assert TokenCache(tmp_path, {"k": 2}).load("v", "src") is None
        assert torch.equal(cache.load("v", "src").grids["axial/0"].valid, _tokens().grids["axial/0"].valid)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "bank.json").read_text())


def _edit_manifest(folder: Path, edit: Callable[[dict], None]) -> None:
    manifest = _manifest(folder)
    edit(manifest)
    (folder / "bank.json").write_text(json.dumps(manifest))


def test_bank_records_the_sha256_of_each_array(tmp_path: Path) -> None:
    _bank(tmp_path)
    spec = _manifest(tmp_path)["parts"][""]["keys"]["axial/0"]
    for what in ("tokens", "valid"):
        assert spec[f"{what}_sha256"] == hashlib.sha256((tmp_path / spec[what]).read_bytes()).hexdigest()


def _truncate(folder: Path) -> None:
    path = folder / _manifest(folder)["parts"][""]["keys"]["axial/0"]["tokens"]
    path.write_bytes(path.read_bytes()[:-100])


def _change_bytes(folder: Path) -> None:
    path = folder / _manifest(folder)["parts"][""]["keys"]["axial/0"]["valid"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _fewer_volumes(manifest: dict) -> None:
    manifest.update(n_volumes=1, volumes=["a"], sources=["x"], subjects=[["", ""]])


# (damage, what the one error line must name besides the file)
DAMAGES = {
    "no parts": (lambda f: _edit_manifest(f, lambda m: m.pop("parts")), "'parts'", "bank.json"),
    "no sha256": (
        lambda f: _edit_manifest(f, lambda m: m["parts"][""]["keys"]["axial/0"].pop("tokens_sha256")),
        "parts['']['keys']['axial/0']['tokens_sha256']",
        "bank.json",
    ),
    "old version": (lambda f: _edit_manifest(f, lambda m: m.update(version=1)), "version 1", "bank.json"),
    "list lengths": (lambda f: _edit_manifest(f, lambda m: m.update(volumes=["a"])), "1 volumes", "bank.json"),
    "truncated": (_truncate, "truncated", "axial_0.tokens.npy"),
    "fewer volumes": (lambda f: _edit_manifest(f, _fewer_volumes), "n_volumes 1", "axial_0.tokens.npy"),
    "changed bytes": (_change_bytes, "parts['']['keys']['axial/0']['valid_sha256']", "axial_0.valid.npy"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_bank_is_one_line_naming_file_and_key(damage: str, tmp_path: Path) -> None:
    from scripts.errors import CS3FInputError

    _bank(tmp_path)
    TokenBank(tmp_path)  # intact: opens
    fn, key, file = DAMAGES[damage]
    fn(tmp_path)
    with pytest.raises(CS3FInputError) as info:
        TokenBank(tmp_path)
    message = str(info.value)
    assert "\n" not in message and key in message, message
    assert message.endswith(")") and message.rsplit("(", 1)[1].rstrip(")").endswith(file), message


def test_bank_identity_has_depth_phases_and_a_mismatch_names_it(tmp_path: Path) -> None:
    from scripts.errors import CS3FInputError
    from scripts.storage.bank import bank_identity

    describe = {"axes": ["axial"], "q": [8, 8, 8], "d": 8, "seed": 0, "delta": 0.0}
    one = bank_identity(describe, "Tiny", {})  # describe leaves out the paper's depth_phases 1
    two = bank_identity({**describe, "depth_phases": 2}, "Tiny", {})
    assert (one["depth_phases"], two["depth_phases"]) == (1, 2)
    writer = BankWriter(tmp_path, capacity=1)
    writer.add("a", "", _tokens())
    writer.finish(two)
    bank = TokenBank(tmp_path)
    bank.check(two)
    with pytest.raises(CS3FInputError) as info:
        bank.check(one)
    message = str(info.value)
    assert "depth_phases (bank 2, run 1)" in message and message.endswith(f"({tmp_path / 'bank.json'})")
