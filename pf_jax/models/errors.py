"""Named exceptions for bad model input: each message names the file, tensor or key and what was expected."""

from pf_jax.config.errors import UserError


class ModelInputError(UserError):
    """Base class: a model config or weights file cannot be used as given."""


class UnsupportedArchitectureError(ModelInputError):
    """The config names an architecture (model_type) this decoder does not implement."""


class WeightsFileError(ModelInputError):
    """A config or weights file is missing, truncated or malformed (the message names the path)."""


class MissingTensorError(ModelInputError):
    """A tensor the config requires is absent from the weights (names file and tensor)."""


class TensorShapeError(ModelInputError):
    """A tensor's shape differs from what the config implies (names file, tensor, expected and got)."""


class NonFiniteWeightsError(ModelInputError):
    """A weights file holds NaN or inf: names the file and the first such tensor."""
