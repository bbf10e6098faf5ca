"""The quality evaluator's user error (one line on the CLI, like every SpectrtError)."""

from spectrt.errors import SpectrtError


class QualityError(SpectrtError):
    """`spectrt eval` cannot run as asked: unknown text, missing source model, impossible window..."""
