"""JSON from received files: :func:`json_loads` fails only with ``ValueError``.

``json.loads`` raises ``RecursionError`` on arrays or objects nested deeper than the
interpreter's recursion limit (a few KB of ``[[[[…``), which callers that skip or refuse
bad JSON (``except ValueError``) do not expect; here it is a
:class:`json.JSONDecodeError` (a ``ValueError``) like any other malformed document.
"""

from __future__ import annotations

import json
from typing import Any


def json_loads(text: str | bytes) -> Any:
    """``json.loads(text)``; nesting too deep for the parser is a ``JSONDecodeError``."""
    try:
        return json.loads(text)
    except RecursionError:
        doc = text if isinstance(text, str) else text[:200].decode("utf-8", "replace")
        raise json.JSONDecodeError("nested too deeply", doc[:200], 0) from None
