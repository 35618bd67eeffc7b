"""Input errors and how the bundle shows them: one ``cs3f: error: ...`` line, exit code 1. A leaf module.

The parsers take values as a config or the command line gives them (``--use_masks false`` is ``"false"``).
"""

from __future__ import annotations

import errno
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence

__all__ = [
    "CS3FInputError",
    "Interrupted",
    "WeightsNotFoundError",
    "as_bool",
    "as_choice",
    "as_float",
    "as_int",
    "bad_value",
    "find_input_error",
    "install_excepthook",
    "one_line",
    "os_error",
]


class CS3FInputError(ValueError):
    """Bad user input (files, folders, parameters, weights): the bundle command shows it as one line."""


class WeightsNotFoundError(CS3FInputError, FileNotFoundError):
    """Encoder weights are not where the configuration says; the message says how to get them."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread so that every ``finally`` runs (lock, staging folder)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: OS faults at a write shown as one line: disk or quota full, name too long, no permission, read-only
OS_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS)


def os_error(err: OSError, path: object = None, doing: str = "") -> CS3FInputError | None:
    """``err`` as one line ``[doing: ]<os.strerror> [<ERRNO>] (<file>)`` if it is one of :data:`OS_FAULTS`."""
    if not isinstance(err, OSError) or err.errno not in OS_FAULTS:
        return None
    where = err.filename if err.filename is not None else path
    what = f"{os.strerror(err.errno)} [{errno.errorcode[err.errno]}]" + (f" ({where})" if where else "")
    return CS3FInputError(f"{doing}: {what}" if doing else what)


# How a CS3FInputError reads in a traceback re-raised as text (DataLoader workers send only text).
_MARKER = re.compile(rf"^{re.escape(__name__)}\.\w+: (.*)$")


def find_input_error(exc: BaseException | None) -> CS3FInputError | None:
    """The :class:`CS3FInputError` behind ``exc``, if any: through the ``__cause__``/``__context__`` chain
    (MONAI wraps exceptions) and the traceback text that ``DataLoader`` workers re-raise; an OS fault
    (:func:`os_error`) is one too."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        for line in str(exc).splitlines():
            match = _MARKER.match(line)
            if match:
                return CS3FInputError(match.group(1))
        if isinstance(exc, CS3FInputError):
            return exc
        if (fault := os_error(exc)) is not None:
            return fault
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


_signalled: list[int] = []


def _interrupt(signum: int, frame: object) -> None:
    _signalled.append(signum)
    raise Interrupted(signum)


def install_excepthook(signals: bool = True) -> None:
    """Make an uncaught :class:`CS3FInputError` (or one wrapped by MONAI) print one ``cs3f: error: ...`` line
    and exit 1 (under torchrun: the first process to stop prints it), and with ``signals`` SIGINT/SIGTERM one
    ``cs3f: interrupted`` line and exit 128 + the signal; other errors keep their traceback."""
    previous, main = sys.excepthook, threading.main_thread()
    stderr = sys.stderr  # torch.distributed's hook, installed later, lends this one a buffer it never prints
    if signals and threading.current_thread() is main:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _interrupt)

    def hook(exc_type, exc, tb):  # noqa: ANN001 - signature fixed by sys.excepthook
        if _signalled and threading.current_thread() is not main:
            return  # a helper thread failing in the teardown after a signal (DataLoader fd sharing)
        if isinstance(exc, KeyboardInterrupt):  # a fresh line: a progress bar may have left the cursor mid-line
            name = signal.Signals(signum := getattr(exc, "signum", signal.SIGINT)).name
            print(f"\ncs3f: interrupted ({name}); no partial outputs were published, rerun to resume", file=stderr)
            sys.exit(128 + signum)
        found = find_input_error(exc)
        if found is not None:
            if _input_errors(1) == 1:
                print(f"\ncs3f: error: {found}", file=stderr, flush=True)
            sys.exit(1)
        if isinstance(exc, Exception) and _input_errors(0):  # e.g. a collective that lost that process
            sys.exit(1)
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def _input_errors(add: int) -> int:
    """Input errors counted in this torchrun job's store, with ``add`` more (outside torchrun, or where the
    store cannot be reached: ``add``): the first process to stop on bad input prints it, once."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return add
    try:
        from datetime import timedelta

        from torch.distributed import TCPStore

        address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = TCPStore(address, port, is_master=False, timeout=timedelta(seconds=3))
        return store.add(f"cs3f/input_errors/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", add)
    except Exception:  # noqa: BLE001 - a line twice rather than none
        return add


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def bad_value(key: str, value: object, allowed: str) -> CS3FInputError:
    """``{key} must be {allowed}, got {value!r}``."""
    return CS3FInputError(f"{key} must be {allowed}, got {value!r}")


def as_bool(value: object, key: str = "value") -> bool:
    """``True``/``False`` from a bool or the words true/false (any case; also yes/no, on/off, 1/0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise bad_value(key, value, "true or false")


def as_int(value: object, key: str, low: int | None = None, allow_none: bool = False) -> int | None:
    """An int (or its digits as text) ``>= low``; ``None`` passes where ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise bad_value(key, value, f"an integer{bound}" + (" or null" if allow_none else ""))
    return int(value)


def as_float(value: object, key: str, check: Callable[[float], bool], allowed: str) -> float:
    """A finite number (or its text) for which ``check`` holds; ``allowed`` says which."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or not check(number):
        raise bad_value(key, value, allowed)
    return number


def as_choice(value: object, key: str, choices: Sequence[str], upper: bool = False) -> str:
    """One of ``choices``, compared in lower case (upper case with ``upper``)."""
    text = str(value).strip()
    text = text.upper() if upper else text.lower()
    if not isinstance(value, str) or text not in choices:
        raise bad_value(key, value, "one of " + ", ".join(choices))
    return text
