"""The one exception type a user sees as a single line, never as a traceback."""


class UserError(Exception):
    """Bad input (config, files, URLs, storage): __main__ prints it on one line and exits 2."""


class ConfigError(UserError):
    """A composed config or search space that cannot be used."""


class DataError(UserError):
    """A dataset file that is missing, truncated, corrupt or of the wrong shape."""
