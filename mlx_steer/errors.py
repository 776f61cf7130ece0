"""Typed errors. Every error a user can cause derives from `MlxSteerError`."""


class MlxSteerError(Exception):
    """Base class of every error raised on purpose by mlx-steer."""


class ModelNotFoundError(MlxSteerError, LookupError):
    """The model name is unknown, or the model is neither cached nor downloadable."""


class UnsupportedModelError(MlxSteerError, ValueError):
    """The model's architecture or file cannot be steered by mlx-steer."""


class UnsupportedGGUFTypeError(UnsupportedModelError):
    """A GGUF tensor uses a quantisation type that MLX does not read correctly."""


class LayerOutOfRangeError(MlxSteerError, IndexError):
    """A layer index outside 0 … num_layers-1."""


class VectorShapeError(MlxSteerError, ValueError):
    """A steering vector whose size does not match the model's hidden size."""


class InvalidStrengthError(MlxSteerError, ValueError):
    """A strength that is NaN, infinite or not a number."""


class InvalidPositionsError(MlxSteerError, ValueError):
    """A `positions` rule that is not "all", "prompt", "generated" or an int ≥ 0."""


class EmptyPromptError(MlxSteerError, ValueError):
    """A prompt with no text."""


class PromptTooLongError(MlxSteerError, ValueError):
    """A prompt longer than the model's context window."""


class ModelMismatchError(MlxSteerError, ValueError):
    """A vector or concept made for another model."""


class ConceptNotFoundError(MlxSteerError, LookupError):
    """No concept of that name exists for this model."""


class InvalidNameError(MlxSteerError, ValueError):
    """An unsafe or malformed concept name."""


class CorruptFileError(MlxSteerError, ValueError):
    """A file that cannot be read: truncated, corrupt or of the wrong format."""


class InvalidArgumentError(MlxSteerError, ValueError):
    """Any other argument that is out of range or malformed."""


class ServerBusyError(MlxSteerError, RuntimeError):
    """The server's request queue is full: try again later."""


class DistributedError(MlxSteerError, RuntimeError):
    """A rank of a distributed run failed or did not answer in time; no partial results."""


class InvalidTokenError(InvalidArgumentError):
    """A token id that is not an integer in 0 … vocab_size-1."""


class StorageError(MlxSteerError, OSError):
    """A file could not be written (disk full, no permission, missing folder); nothing
    already saved was changed."""
