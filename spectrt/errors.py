"""spectrt's user-facing exceptions, importable as ``spectrt.errors``.

They live beside the runtime (``spectrt.runtime.errors``) so that the lean runtime needs nothing from the
CLI's package; this module re-exports them for the compiler, the CLI and users' code.
"""

from spectrt.runtime.errors import (  # noqa: F401
    BackendUnavailableError,
    BundleError,
    ConfigError,
    EngineBuildError,
    ExportError,
    FetchError,
    GenerationError,
    ModelLoadError,
    PairMismatchError,
    SpectrtError,
)

__all__ = [
    "SpectrtError", "ConfigError", "ModelLoadError", "PairMismatchError", "ExportError", "EngineBuildError",
    "BackendUnavailableError", "BundleError", "FetchError", "GenerationError",
]
