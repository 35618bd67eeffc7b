"""Input errors and how the bundle shows them: one ``cs3f: error: ...`` line, exit code 1.

A leaf module: it imports nothing of the bundle, so every layer can raise these.
"""

from __future__ import annotations

import re
import sys

__all__ = ["CS3FInputError", "WeightsNotFoundError", "find_input_error", "install_excepthook", "one_line"]


class CS3FInputError(ValueError):
    """Bad user input (files, folders, parameters, weights): the bundle command shows it as one line."""


class WeightsNotFoundError(CS3FInputError, FileNotFoundError):
    """Encoder weights are not where the configuration says; the message says how to get them."""


# How a CS3FInputError reads in a traceback re-raised as text (DataLoader workers send only text).
_MARKER = re.compile(rf"^{re.escape(__name__)}\.\w+: (.*)$")


def find_input_error(exc: BaseException | None) -> CS3FInputError | None:
    """The :class:`CS3FInputError` behind ``exc``, if any.

    Looks through the ``__cause__``/``__context__`` chain (MONAI's config parser and ``Compose`` wrap
    exceptions) and through the text of exceptions re-raised by ``DataLoader`` worker processes,
    which carry only the original traceback as a string (and may be re-raised as the same type with
    that whole traceback as their message).
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        for line in str(exc).splitlines():
            match = _MARKER.match(line)
            if match:
                return CS3FInputError(match.group(1))
        if isinstance(exc, CS3FInputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def install_excepthook() -> None:
    """Make an uncaught :class:`CS3FInputError` print one ``cs3f: error: ...`` line and exit 1.

    MONAI's config parser wraps exceptions raised while evaluating expressions; the hook looks through
    the chain so that the user sees the cause, not a parser traceback. Other errors keep their
    traceback.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # noqa: ANN001 - signature fixed by sys.excepthook
        found = find_input_error(exc)
        if found is not None:
            # Start a fresh line: a progress bar may have left the cursor mid-line.
            print(f"\ncs3f: error: {found}", file=sys.stderr)
            sys.exit(1)
        previous(exc_type, exc, tb)

    sys.excepthook = hook
