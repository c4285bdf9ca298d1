"""The exceptions a user sees: one-line messages the CLI prints without a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the CLI prints it as one line (no traceback) and exits 2."""


class TrainingInterrupted(Exception):
    """Ctrl-C: a resumable checkpoint was written."""


class NonFiniteLoss(UserError):
    """The loss became NaN/Inf: the last good checkpoint is kept."""
