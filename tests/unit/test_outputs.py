"""One run per output folder, outputs published as one set, the folder scan, OS faults as one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from monai.data import DataLoader, Dataset
from scripts.engine.datalist import make_datalist
from scripts.engine.evaluator import CS3FEvaluator
from scripts.errors import CS3FInputError, find_input_error, os_error
from scripts.inferer import CS3FInferer
from scripts.storage import atomic
from scripts.storage.atomic import atomic_write_text
from scripts.storage.cache import TokenCache
from scripts.storage.outputs import LOCK, OutputLock, Publication, check_name_lengths
from tests.helpers import TinyEncoder


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


# ------------------------------------------------------------------------------------------- the lock
def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dead = _dead_pid()
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "then"}))
    lock = OutputLock(tmp_path)
    lock.acquire()
    assert f"taking over the lock left by a run that ended (pid {dead} on" in capsys.readouterr().out
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_live_lock_refuses_a_second_run_in_one_line(tmp_path: Path) -> None:
    first = Publication(tmp_path)
    first.open()
    atomic_write_text(first.staged(tmp_path / "run.json"), "{}")
    second = Publication(tmp_path)
    with pytest.raises(CS3FInputError) as info:
        second.open()  # another open file: flock refuses it even in this process
    second.close()
    line = str(info.value)
    assert "\n" not in line and f"another run is writing to {tmp_path}" in line
    assert f"pid {os.getpid()} on {socket.gethostname()}" in line
    assert (tmp_path / ".cs3f-staging" / "run.json").is_file()  # the refused run left the live one alone
    first.close()
    lock = OutputLock(tmp_path)
    lock.acquire()  # free again, and no note: release removed the file
    lock.release()


# -------------------------------------------------------------------------------------- the folder scan
def test_the_folder_scan_skips_maps_and_hidden_files(tiny_cohort: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    shutil.copytree(tiny_cohort / "images", flat)
    volumes = sorted(p.name.removesuffix(".nii.gz") for p in flat.iterdir())
    first = flat / f"{volumes[0]}.nii.gz"
    for junk in (f"{volumes[0]}_anomaly.nii.gz", f"._{volumes[0]}.nii.gz", ".hidden.nii.gz"):
        shutil.copy(first, flat / junk)
    assert [r["name"] for r in make_datalist(flat, masks=False)] == volumes
    (tmp_path / "layout" / "images").mkdir(parents=True)
    for path in flat.iterdir():
        shutil.copy(path, tmp_path / "layout" / "images")
    assert [r["name"] for r in make_datalist(tmp_path / "layout", masks=False)] == volumes


# ------------------------------------------------------------------------------------ name lengths
def test_names_too_long_for_the_file_system_stop_the_run_before_any_work(tmp_path: Path) -> None:
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    # the map's temporary file is ".<stem>_anomaly.tmp-<8 hex>.nii.gz": 29 characters more than the stem
    fits, too_long = "a" * (limit - 29), "b" * (limit - 28)
    check_name_lengths(tmp_path, [f"{fits}_anomaly.nii.gz"], keep_suffix=True)
    (tmp_path / f".{fits}_anomaly.tmp-12345678.nii.gz").touch()  # the OS agrees that it fits
    with pytest.raises(OSError) as info:
        (tmp_path / f".{too_long}_anomaly.tmp-12345678.nii.gz").touch()
    assert info.value.errno == errno.ENAMETOOLONG
    rows = [{"name": n, "image": torch.zeros(1, 8, 8, 8)} for n in ("short", too_long)]
    loader = DataLoader(Dataset(rows), batch_size=1)
    with pytest.raises(CS3FInputError, match=rf"file name too long .*{limit} characters at most.*\({too_long}_anomaly"):
        CS3FEvaluator("cpu", loader, TinyEncoder(32), CS3FInferer(q=8, d=16), tmp_path / "out", cache_dir=None)
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------- OS faults
@pytest.mark.parametrize("code", ["ENOSPC", "ENAMETOOLONG", "EACCES", "EPERM", "EROFS", "EDQUOT"])
def test_os_faults_are_one_line_naming_the_file_and_the_meaning(code: str) -> None:
    number = getattr(errno, code)
    line = str(os_error(OSError(number, "ignored"), "/out/a.nii.gz", "cannot write"))
    assert line == f"cannot write: {os.strerror(number)} [{code}] (/out/a.nii.gz)"
    wrapped = RuntimeError("SaveImage cannot find a suitable writer")
    wrapped.__context__ = OSError(number, "x", "/out/b.nii.gz")
    assert str(find_input_error(wrapped)) == f"{os.strerror(number)} [{code}] (/out/b.nii.gz)"
    assert os_error(OSError(errno.EIO, "x")) is None  # other errors keep their traceback


def _disk_full(*args, **kwargs):  # noqa: ANN002, ANN003
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "scores.csv"
    atomic_write_text(target, "old\n")
    monkeypatch.setattr(os, "write", _disk_full)
    with pytest.raises(CS3FInputError) as info:
        atomic.atomic_write(target, lambda tmp: os.write(os.open(tmp, os.O_WRONLY), b"new"))
    assert str(info.value) == f"cannot write: No space left on device [ENOSPC] ({target})"
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]


def test_a_full_disk_under_torch_save_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save reports a failed write without its errno; the writer asks the OS with an append."""
    cache = TokenCache(tmp_path, {"k": 1})
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("file write failed")))
    monkeypatch.setattr(atomic, "open", _disk_full, raising=False)
    grid = {"axial/0": (torch.zeros(2, 8), torch.ones(2, dtype=torch.bool))}
    from scripts.tokens import TokenGrid, VolumeTokens

    tokens = VolumeTokens((8, 8, 8), {k: TokenGrid(*v) for k, v in grid.items()})
    with pytest.raises(CS3FInputError, match=r"^cannot write: No space left on device \[ENOSPC\] \(.*v\.pt\)$"):
        cache.save("v", "src", tokens)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # with room on the disk, the library's error stands
        cache.save("v", "src", tokens)


# ---------------------------------------------------------------------------------- the publish set
def _previous_run(out: Path) -> dict[str, bytes]:
    out.mkdir()
    for name, text in {"a_anomaly.nii.gz": "old a", "b_anomaly.nii.gz": "old b", "run.json": "old"}.items():
        (out / name).write_text(text)
    (out / "scores.csv").write_text("image,score\na,1\nb,2\n")
    (out / "metrics.json").write_text("{}")  # an evaluation of the old maps
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _stage_new_run(out: Path) -> Publication:
    publication = Publication(out)
    publication.open()
    for name, text in {"a_anomaly.nii.gz": "new a", "c_anomaly.nii.gz": "new c", "run.json": "new"}.items():
        atomic_write_text(publication.staged(out / name), text)
    atomic_write_text(publication.staged(out / "scores.csv"), "image,score\na,3\nc,4\n")
    publication.stale += [out / "b_anomaly.nii.gz", out / "metrics.json"]
    return publication


NEW = {
    "a_anomaly.nii.gz": b"new a",
    "c_anomaly.nii.gz": b"new c",
    "run.json": b"new",
    "scores.csv": b"image,score\na,3\nc,4\n",
}


def _contents(out: Path) -> dict[str, bytes | None]:
    """Every entry of ``out``: a file's bytes, ``None`` for a folder."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in out.iterdir()}


def test_a_published_set_replaces_the_previous_run_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _previous_run(out)
    publication = _stage_new_run(out)
    assert (out / "run.json").read_bytes() == b"old"  # nothing visible before publishing
    publication.publish()
    publication.close()
    assert _contents(out) == NEW  # the stale map and report gone, no staging folder, no lock


def test_an_output_folder_given_as_a_relative_path_is_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _previous_run(tmp_path / "out")
    publication = _stage_new_run(Path("out"))  # the stale files relative, the folder absolute
    publication.publish()
    publication.close()
    assert _contents(tmp_path / "out") == NEW


def test_a_failure_before_the_commit_leaves_the_previous_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    before = _previous_run(out)
    publication = _stage_new_run(out)
    monkeypatch.setattr(os, "rename", _disk_full)
    with pytest.raises(CS3FInputError, match=r"cannot publish: No space left on device"):
        publication.publish()
    publication.close()
    assert _contents(out) == before


def test_a_publication_stopped_midway_is_completed_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _previous_run(out)
    publication = _stage_new_run(out)
    moves = []

    def crash_on_the_second_move(src, dst):  # noqa: ANN001 - as os.replace
        if ".cs3f-publishing" in str(src):
            if moves:
                raise KeyboardInterrupt  # a kill: no cleanup beyond this point
            moves.append(dst)
        os.rename(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_second_move)
    with pytest.raises(KeyboardInterrupt):
        publication.publish()
    monkeypatch.undo()
    publication.lock.release()  # the process died: the kernel frees its lock
    assert _contents(out)["a_anomaly.nii.gz"] == b"new a" and _contents(out)["run.json"] == b"old"
    assert (out / ".cs3f-publishing").is_dir()  # the interrupted publication is detectable ...
    later = Publication(out)
    later.open()  # ... and the next run completes it
    later.close()
    assert _contents(out) == NEW


def test_an_unreplaceable_output_stops_the_publication_before_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    before = _previous_run(out)
    publication = _stage_new_run(out)
    access = os.access  # scores.csv made immutable (chattr +i) meanwhile: not writable, even by root
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "scores.csv" and access(path, mode))
    with pytest.raises(CS3FInputError, match=r"cannot replace an earlier output: Permission denied"):
        publication.publish()
    publication.close()
    assert _contents(out) == before


def test_the_evaluation_holds_the_folder_lock(tmp_path: Path) -> None:
    """configs/evaluate.json evaluates after the run released its lock: the evaluation takes it again, so a
    run publishing into the folder meanwhile is one line, not maps of two runs in one report."""
    from scripts.evaluation.report import evaluate_outputs

    running = OutputLock(tmp_path)
    running.acquire()
    try:
        with pytest.raises(CS3FInputError, match="another run is writing to"):
            evaluate_outputs([{"name": "a", "image": "a.nii.gz", "label": "a_seg.nii.gz"}], tmp_path)
    finally:
        running.release()
    assert not list(tmp_path.iterdir())  # nothing written, the lock file gone
