"""The errors the Anima context-token nodes raise; each message starts with its name.

Users search for these exact phrases, so the names are fixed; the rest of each message says what
was received and what to do.
"""

from __future__ import annotations


class InvalidReferenceImageShape(ValueError):
    def __init__(self, detail: str):
        super().__init__(f"Invalid reference image shape: {detail}")


class TokenOptimizationFailed(RuntimeError):
    def __init__(self, detail: str):
        super().__init__(f"Token optimization failed: {detail}")


class IncompatibleModelArchitecture(TypeError):
    def __init__(self, detail: str):
        super().__init__(f"Incompatible model architecture: {detail}")


class InvalidTrainingSetting(ValueError):
    """A training setting no trainer can use (checked before any model work, so nothing is wasted)."""

    def __init__(self, detail: str):
        super().__init__(f"Invalid training setting: {detail}")


class InvalidReferenceImageFile(ValueError):
    """A reference image file that cannot be read as a picture (damaged, truncated, or another format)."""

    def __init__(self, detail: str):
        super().__init__(f"Invalid reference image file: {detail}")
