"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad config, missing file, unreadable URL, missing weights offline: say what to do."""


class ConfigError(UserError):
    """A config that cannot describe a run: unknown key, wrong type, bad value."""
