"""The error Wan nodes raise for an input they cannot use (an empty image batch, a latent of the
wrong shape): a ValueError of the pack's own, whose message names the input and what to connect."""

from __future__ import annotations


class WanInputError(ValueError):
    """An IMAGE, LATENT or setting given to a Wan node that it cannot work with."""
