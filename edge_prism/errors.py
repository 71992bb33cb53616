"""Every exception edge-prism raises on purpose.

Messages are one line and say what is wrong, with which file or value, and what to do.
The CLI prints them as ``error: <message>`` and exits with status 2.
"""

from __future__ import annotations


class EdgePrismError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ModelNotFoundError(EdgePrismError):
    """The model path does not exist or holds nothing loadable."""


class UnsupportedModelError(EdgePrismError):
    """The checkpoint is of a family, format or feature edge-prism does not run."""


class CorruptCheckpointError(EdgePrismError):
    """A checkpoint file is truncated, damaged, or disagrees with its config."""


class ShapeMismatchError(CorruptCheckpointError):
    """A tensor's shape disagrees with what the config implies."""


class PrismCheckpointError(CorruptCheckpointError):
    """A prism checkpoint is damaged, of another format version, or stale."""


class FileAccessError(EdgePrismError):
    """A file or directory exists but cannot be read or written (permissions, a read-only or
    full disk), so the fix is on the machine, not in the file."""


class OutputBusyError(EdgePrismError):
    """Another process is writing the same output right now."""


class ContextLengthError(EdgePrismError):
    """A prompt (plus the tokens to generate) does not fit the context."""


class ConfigError(EdgePrismError):
    """An option has a value that cannot be used (size, budget, operating point...)."""


class BudgetError(ConfigError):
    """A memory or latency budget is too small to run the model."""


class TokenizerError(EdgePrismError):
    """The model has no usable tokenizer or chat template for the request."""


class EngineBusyError(EdgePrismError):
    """An engine is used while it cannot be: a generation of the same thread is still open
    (a stream neither finished nor closed), or the engine was closed."""
