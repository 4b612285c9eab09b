"""Decomposition methods: each is a frozen, validated config (``fxdeco.Falor``) and the code that runs it.

A config is the one place a method's options, their defaults, ranges and
meaning are written; it also says what calibration the method needs, so
``transform``, ``prepare``, the torch.compile backend and the CLI ask it
instead of reading options themselves. ``method_config("falor", **options)``
builds one from a name and keyword options, with a "did you mean" for typos.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from fxdeco.methods.base import MethodConfig
from fxdeco.methods.dwain.config import Dwain
from fxdeco.methods.falor.config import Falor
from fxdeco.methods.lockd.config import Lockd

# method name -> its config class
METHODS: dict[str, type[MethodConfig]] = {"falor": Falor, "lockd": Lockd, "dwain": Dwain}


def option_names(config_class: type[MethodConfig]) -> list[str]:
    """The options of a method, in the order its config declares them."""
    return [f.name for f in dataclasses.fields(config_class)]


def method_config(method: str | MethodConfig = "falor", **options: Any) -> MethodConfig:
    """The config of ``method`` with ``options``; a config given as ``method`` is returned as is.

    Example:
        >>> method_config("falor", keep_params=0.5).mode
        'budget'
        >>> method_config("falor", nsr_treshold=0.1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: unknown option 'nsr_treshold' for method 'falor' (did you mean 'nsr_threshold'?); valid options: ...
    """
    if isinstance(method, MethodConfig):
        if options:
            raise TypeError(f"options {sorted(options)} were given beside a {type(method).__name__} config; set them "
                            f"in the config: {type(method).__name__}(..., {next(iter(options))}=...)")
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    valid = option_names(METHODS[method])
    unknown = sorted(set(options) - set(valid))
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''} {names} for method {method!r}{hint}; "
                        f"valid options: {', '.join(sorted(valid))}")
    return METHODS[method](**options)


__all__ = ["METHODS", "Dwain", "Falor", "Lockd", "MethodConfig", "method_config", "option_names"]
