"""Errors a user can act on: the CLI prints their message alone and exits with status 2."""


class UserError(Exception):
    """A mistake in what the user gave us (a file, a flag, a dataset): no traceback is shown."""


class ConfigError(UserError):
    """A YAML file or a --set override that does not resolve to a valid config."""


class DataError(UserError):
    """A dataset that cannot be read: a bad labels CSV, a missing folder, too many bad images."""


class Interrupted(Exception):
    """A search stopped by a signal (Ctrl-C, SIGTERM) after saving its state; it can be resumed."""

    def __init__(self, message: str, signal_number: int, run_dir) -> None:
        super().__init__(message)
        self.signal_number, self.run_dir = signal_number, run_dir
