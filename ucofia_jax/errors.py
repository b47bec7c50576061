"""Errors every layer may raise and the command line reports in one line (runtime/cli.py).

Here, not in config.py, so that modules config.py imports (training/) can raise them too.
"""


class ConfigError(ValueError):
    """A bad config value, or a config that does not fit what it meets (a checkpoint, the
    parameter tree); the message names the key (``config.a.b``)."""
