"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad config, missing file, unreadable URL, missing weights offline: say what to do."""


class ConfigError(UserError):
    """A config that cannot describe a run: unknown key, wrong type, bad value."""


QUOTE_CHARS = 200  # an error quotes at most this much of a received file


def clip(text: str, limit: int = QUOTE_CHARS) -> str:
    """``text`` cut to ``limit`` characters (marked with "…") for an error line."""
    return text if len(text) <= limit else text[:limit - 1] + "…"
