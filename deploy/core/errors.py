"""Typed, actionable errors. The CLI turns every `ArqError` into one line on stderr and exit code 2."""


class ArqError(Exception):
    """Base class of every error a user can cause; its message says what to fix."""


class UnknownNameError(ArqError):
    """An unknown model, dataset, target or backend name."""


class WeightsMismatchError(ArqError):
    """A weights file that does not fit the chosen architecture."""


class PolicyError(ArqError):
    """A quantization policy naming unknown layers or bits outside the supported range."""


class DataFormatError(ArqError):
    """A data path in no known format, or images of the wrong shape."""


class ModelFormatError(ArqError):
    """A malformed or unsupported ONNX/torch model file."""


class ExportMismatchError(ArqError):
    """The exported ONNX model disagrees with the torch fake-quant model beyond tolerance."""


class UnsupportedOpError(ArqError):
    """An operator the compiler or exporter cannot take."""


class ArtifactIntegrityError(ArqError):
    """A compiled artifact whose files do not match the hashes in its manifest."""


class CertificationInputError(ArqError):
    """Bad certification parameters (sigma, N0, N, alpha) or inputs (shape, NaN)."""


class DeviceUnavailableError(ArqError):
    """The target's device (a CUDA GPU, an NVIDIA driver) is not present on this machine."""
