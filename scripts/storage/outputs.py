"""One run per output folder (:class:`OutputLock`), its outputs published as one set (:class:`Publication`);
the design is in docs/design.md ("One run per output folder")."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from scripts.errors import CS3FInputError, os_error
from scripts.storage.atomic import atomic_write_json, temp_name

__all__ = ["OutputLock", "Publication", "check_name_lengths", "check_output_dir"]

LOCK, STAGING, PUBLISHING, MANIFEST = ".cs3f.lock", ".cs3f-staging", ".cs3f-publishing", ".manifest.json"
#: files moved into place last, in this order: a complete ``run.json`` means a complete set
LAST = ("registration.csv", "scores.csv", "run.json")


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output_dir(output_dir: str | Path, replaced: Iterable[str] = ()) -> Path:
    """Fail early (before any heavy work) if ``output_dir`` cannot be created or written, or one of the
    ``replaced`` files in it cannot be replaced; create nothing."""
    path = Path(output_dir).absolute()
    existing = _existing(path)
    if not existing.is_dir():
        raise CS3FInputError(f"output_dir {path} cannot be created: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise CS3FInputError(f"output_dir {path} is not writable ({existing}: {err.strerror})") from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CS3FInputError(f"output_dir {path} is not writable ({existing})")
    for name in replaced:
        if (path / name).exists() and not os.access(path / name, os.W_OK):
            raise CS3FInputError(
                f"cannot replace an earlier output: {os.strerror(errno.EACCES)} [EACCES] ({path / name})"
            )
    return path


def check_name_lengths(folder: str | Path, names: Iterable[str], keep_suffix: bool = False) -> None:
    """Fail if the temporary file of one of ``names`` (:func:`temp_name`, the longest a write makes) is
    longer than the file system of ``folder`` allows."""
    existing = _existing(Path(folder))
    limit = os.pathconf(existing, "PC_NAME_MAX")
    for name in names:
        if (length := len(temp_name(name, keep_suffix))) > limit:
            raise CS3FInputError(
                f"file name too long for {existing} ({limit} characters at most, the run's temporary file "
                f"needs {length}): shorten the input's name ({name})"
            )


#: lock descriptors this process holds: a forked child (a data-loader worker) closes its copies, so that
#: a killed run's orphaned workers do not keep its lock while they wind down
_HELD: set[int] = set()


def _close_held_locks() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_locks)


class OutputLock:
    """The exclusive lock of a run on ``folder``: :meth:`acquire` it, :meth:`release` it on any exit."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (with a note if a dead run left it); one line naming its holder if a live run has it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise CS3FInputError(
                    f"another run is writing to {self.path.parent} ({holder or 'holder unknown'}): wait for it "
                    "to end or choose another output_dir"
                ) from None
            try:  # the file we locked may have been released and removed meanwhile: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        if holder := _holder(fd):
            print(f"cs3f: note: taking over the lock left by a run that ended ({holder}) in {self.path.parent}")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting run then locks a new file
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None


def _holder(fd: int) -> str:
    """``pid N on HOST since T`` of the lock file open as ``fd`` ('' if empty or unreadable)."""
    try:
        held = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {held['pid']} on {held['host']} since {held['started']}"
    except (ValueError, TypeError, KeyError):
        return ""


class Publication:
    """The outputs of one run in ``folder``: :meth:`open` locks it and makes a fresh staging folder, writers
    write to :meth:`staged` paths, :meth:`publish` moves them into place as one set and removes the
    :attr:`stale` files, :meth:`close` (on any exit) drops what was not published and releases the lock."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).absolute()
        self.staging, self.publishing = self.folder / STAGING, self.folder / PUBLISHING
        self.lock = OutputLock(self.folder)
        self.stale: list[Path] = []  # files of the previous run the new set does not replace
        self._made: list[Path] = []

    def staged(self, path: str | Path) -> Path:
        """Where to write ``path`` now: in the staging folder if ``path`` is in ``folder``."""
        path = Path(path)
        return self.staging / path.name if path.absolute().parent == self.folder else path

    def open(self) -> None:
        """Lock the folder, complete an interrupted publication, make a fresh staging folder."""
        path = self.folder
        while not path.exists():
            self._made.append(path)
            path = path.parent
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            if self.publishing.exists():
                print(f"cs3f: note: completing the publication of an earlier run in {self.folder}")
                self._move_in()
            shutil.rmtree(self.staging, ignore_errors=True)  # a dead run's: never published
            for tmp in self.folder.glob(".*.tmp-*"):  # temporary files of killed runs: no live writer here
                tmp.unlink(missing_ok=True)
            self.staging.mkdir()
        except OSError as err:
            raise os_error(err, self.folder, "cannot write") or err from None

    def publish(self) -> None:
        """Move the staged files into ``folder`` as one set (SIGINT/SIGTERM wait until it is done)."""
        staged = sorted(p.name for p in self.staging.iterdir())
        check_output_dir(self.folder, staged)  # a file the set cannot replace stops the run before the commit
        mask = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, mask)
        try:
            gone = sorted({str(p.absolute().relative_to(self.folder)) for p in self.stale} - set(staged))
            atomic_write_json(self.staging / MANIFEST, {"remove": gone})
            os.rename(self.staging, self.publishing)  # the commit
            self._move_in()
        except OSError as err:
            raise os_error(err, self.folder, "cannot publish") or err from None
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, mask)

    def _move_in(self) -> None:
        """Move the committed files into place, remove the stale ones (idempotent: resumes a stopped move)."""
        manifest = self.publishing / MANIFEST
        gone = json.loads(manifest.read_text())["remove"] if manifest.exists() else []
        files = sorted(p.name for p in self.publishing.iterdir() if p != manifest)
        for name in (n for n in files if n not in LAST):
            os.replace(self.publishing / name, self.folder / name)
        for name in gone:
            (self.folder / name).unlink(missing_ok=True)
            if (self.folder / name).parent != self.folder:
                _rmdir_if_empty((self.folder / name).parent)
        for name in (n for n in LAST if n in files):
            os.replace(self.publishing / name, self.folder / name)
        manifest.unlink(missing_ok=True)
        self.publishing.rmdir()

    def close(self) -> None:
        """Drop an unpublished staging folder, release the lock, remove the folders :meth:`open` made if empty."""
        if self.lock.fd is not None:  # a refused run leaves the running one's staging folder alone
            shutil.rmtree(self.staging, ignore_errors=True)
            self.lock.release()
        for path in self._made:
            if not _rmdir_if_empty(path):
                break
        self._made = []


def _rmdir_if_empty(path: Path) -> bool:
    try:
        path.rmdir()
        return True
    except OSError:
        return False
