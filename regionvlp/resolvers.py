"""The config's own resolvers, registered with OmegaConf on import (by
:mod:`regionvlp.config`): ``${pkgdir:NAME}`` and ``${oc.env:NAME[,DEFAULT]}``, whose
resolved values :func:`mask_secrets` hides wherever text leaves the process."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from regionvlp.errors import ConfigError


_TOP_LEVEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_VALUES: dict[str, str] = {}  # resolved ${oc.env:NAME} values, masked wherever text leaves the process


def package_dir(name: str) -> str:
    """``${pkgdir:NAME}``: the folder of an installed top-level package (so configs can
    point at assets that packages ship, e.g. a bundled text model). Nothing is imported:
    only a top-level name is accepted, whose spec the path finders give without running
    any package code (a dotted name would import its parents)."""
    name = str(name).strip().replace("-", "_")
    if not _TOP_LEVEL_NAME.match(name):
        raise ConfigError(f"${{pkgdir:{name}}}: give the top-level name of an installed package "
                          "(letters, digits, _ or -; no dots or paths)")
    try:
        spec = importlib.util.find_spec(name)  # a top-level name: no parent package to import
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"${{pkgdir:{name}}}: package '{name}' is not installed (pip install it)")
    return str(Path(list(spec.submodule_search_locations)[0]))


def _env(key: str, default: Any = None) -> Optional[str]:
    """``${oc.env:NAME[,DEFAULT]}``, remembering the value so logs and saved configs can mask it."""
    value = os.environ.get(str(key))
    if value is None:
        if default is None:
            raise ConfigError(f"${{oc.env:{key}}}: environment variable '{key}' is not set; export it or "
                              f"give a default, ${{oc.env:{key},DEFAULT}}")
        return None if str(default) == "null" else str(default)
    if len(value) >= 4:  # shorter ones (flags, counts) would mask unrelated text
        _ENV_VALUES[str(key)] = value
    return value


def mask_secrets(text: str) -> str:
    """``text`` with every resolved environment value replaced by ``${oc.env:NAME}``."""
    for key, value in sorted(_ENV_VALUES.items(), key=lambda kv: -len(kv[1])):
        if value in text:
            text = text.replace(value, f"${{oc.env:{key}}}")
    return text


def _register(name: str, fn: Any) -> None:
    # omegaconf >= 2.4 names it register_resolver (register_new_resolver warns); 2.3 only has the latter
    register = getattr(OmegaConf, "register_resolver", None)
    if register is None or not hasattr(OmegaConf, "legacy_register_resolver"):
        register = OmegaConf.register_new_resolver
    register(name, fn, replace=True)


_register("pkgdir", package_dir)
_register("oc.env", _env)
