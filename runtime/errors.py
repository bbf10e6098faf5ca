"""One exception hierarchy for user-facing errors.

Every message says what went wrong and what to do about it. Internal invariants use assert.
"""


class SpectrtError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(SpectrtError):
    """An option or option combination is impossible (e.g. width 0, max context < width)."""


class ModelLoadError(SpectrtError):
    """A model folder/file is missing, corrupt or of an unsupported architecture."""


class PairMismatchError(SpectrtError):
    """Draft and target cannot be paired (different tokenizers, special tokens...)."""


class ExportError(SpectrtError):
    """ONNX export or its validation against the reference failed."""


class EngineBuildError(SpectrtError):
    """TensorRT parsing or engine building failed."""


class BackendUnavailableError(SpectrtError):
    """A requested backend (onnxruntime, tensorrt) is not installed or cannot run here."""


class BundleError(SpectrtError):
    """A bundle is missing, from another schema version, or fails its integrity checks."""


class FetchError(SpectrtError):
    """Model weights could not be fetched or failed their hash check."""


class GenerationError(SpectrtError):
    """A generation request is invalid (empty prompt, prompt longer than max context...)."""
