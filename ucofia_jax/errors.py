"""The problems a user can fix: every error the command lines report in one line.

Every layer raises these (the bottom layer: this module imports nothing of ours). The
command lines (``python -m ucofia_jax.main`` through runtime/cli.py, ``python -m
ucofia_jax.search``) print a :class:`UserError` as ``error: <message>`` and exit with status
2; any other exception is a bug and shows its traceback. A message is one clear line naming
the config key (``config.a.b``) or the file, and what is wrong with it.
"""


class UserError(Exception):
    """A problem the user can fix (a config value, a file, the data); never a bug."""


class ConfigError(UserError, ValueError):
    """A bad config value, or a config that does not fit what it meets (a checkpoint, the
    parameter tree); the message names the key (``config.a.b``)."""


class CheckpointError(UserError, ValueError):
    """Weights that cannot be read or written: a CLIP or released UCoFiA weights file, or a
    run's train-state checkpoint; the message names the file and the problem (and, for a
    run's checkpoints, which one is intact)."""


class DataError(UserError):
    """Bad input data (annotation or video). Raised in strict mode, or when nothing is usable."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss, parameters or optimizer state became NaN/inf; the message names the step,
    the batch's videos and the last checkpoint (which holds a finite state)."""


class SourceError(UserError):
    """A search model source that cannot be loaded (the message names the file and the
    problem)."""


class SearchIndexError(UserError):
    """A path that is not a usable search index (named in the message)."""


class IndexingError(UserError):
    """A user-facing indexing or query failure (the message names the file / index and the
    problem)."""


class ModelMismatch(IndexingError):
    """A search index made by another model (other fingerprint) than the one given."""
