"""Errors a user can act on: the CLI prints their message alone and exits with status 2."""


class UserError(Exception):
    """A mistake in what the user gave us (a file, a flag, a dataset): no traceback is shown."""


class ConfigError(UserError):
    """A YAML file or a --set override that does not resolve to a valid config."""


class DataError(UserError):
    """A dataset that cannot be read: a bad labels CSV, a missing folder, too many bad images."""
