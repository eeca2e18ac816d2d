"""The errors mllm-kd raises for bad input. The command-line entry points print them and exit 2."""


class MllmKdError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class ConfigError(MllmKdError):
    """An unknown or invalid config key or value."""


class DataError(MllmKdError):
    """A missing or corrupt image, a malformed conversation, a sample that cannot fit."""


class CheckpointError(MllmKdError):
    """A missing, incomplete or incompatible checkpoint directory."""


class CompatibilityError(MllmKdError):
    """Teacher and student cannot be distilled together (vocabulary, visual tokens)."""


class TrainingError(MllmKdError):
    """Training cannot go on (a NaN or infinite loss)."""
