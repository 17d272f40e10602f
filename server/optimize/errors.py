"""Why `edgefleet optimize` stopped: each error names the model, file, option or number at fault."""

from __future__ import annotations


class OptimizeError(Exception):
    """Base of every error the optimizer reports to the user."""


class ModelError(OptimizeError):
    """The model is not a usable image classifier (outputs, ops, shapes)."""


class DataError(OptimizeError):
    """The labelled data cannot be used (unreadable image, labels, splits)."""


class BudgetError(OptimizeError):
    """The accuracy budget cannot be met; carries the numbers."""


class OutputExistsError(OptimizeError):
    """The output directory exists; the optimizer never overwrites."""


class QuantizationCollapse(OptimizeError):
    """INT8 outputs no longer match fp32's (e.g. calibrated on unlike data); carries the numbers."""
