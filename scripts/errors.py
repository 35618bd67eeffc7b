"""Exception types shared by the bundle's modules (a leaf module: imports nothing of the bundle)."""

from __future__ import annotations

__all__ = ["CS3FInputError", "WeightsNotFoundError"]


class CS3FInputError(ValueError):
    """Bad user input (files, folders, parameters, weights): the bundle command shows it as one line."""


class WeightsNotFoundError(CS3FInputError, FileNotFoundError):
    """Encoder weights are not where the configuration says; the message says how to get them."""
