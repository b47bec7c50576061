"""Errors every layer may raise and the command line reports in one line (runtime/cli.py).

Here, at the bottom layer, not in config.py: modules that config.py imports (training/)
raise them too.
"""


class ConfigError(ValueError):
    """A bad config value, or a config that does not fit what it meets (a checkpoint, the
    parameter tree); the message names the key (``config.a.b``)."""
