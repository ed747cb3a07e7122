"""Error types. Every user-facing failure is an ``SLMError`` whose message fits on one line.

The CLI catches ``SLMError`` and prints ``error: <message>`` with exit code 2; the Python API lets it propagate.
"""

from __future__ import annotations


class SLMError(ValueError):
    """Base class for errors caused by bad input (a model, a plan, a corpus, a parameter)."""


class UnsupportedArchitectureError(SLMError):
    """The model's ``model_type`` is not one the architecture adapter knows."""


class PlanError(SLMError):
    """A compression plan is malformed, or does not fit the model it is applied to."""


class CalibrationError(SLMError):
    """Calibration data cannot be loaded or is too thin for the requested samples."""


class PassError(SLMError):
    """An unknown pass, or bad parameters for a pass."""


class ModelLoadError(SLMError):
    """A model or tokenizer cannot be found or loaded."""
