"""The errors mllm-kd raises for bad input. The command-line entry points print them and exit 2."""

import argparse
import sys
from typing import NoReturn


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


def exit_code(e: MllmKdError) -> int:
    """What every command line does with an input error: print it as one line ``error: ...`` on stderr
    (a multi-line message, e.g. a YAML parser's, is joined), no traceback; the exit status is 2."""
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its own errors (a missing option, ``--batch-size abc``) reported like every other
    input error: one line ``error: ...`` and exit status 2, instead of the usage text and then the error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (--help shows the usage)", file=sys.stderr)
        sys.exit(2)
