"""The one registry of distillation methods.

Every module in this package is imported once, and each `Distiller` subclass with a `name`
registers itself through `register`; a name registered twice is a warning (timm's registry
does the same), so adding a method touches only its own file.
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings

from fastkd.config import ConfigError, from_dict

from .base import Distiller, LogitDistiller, Needs, NoParams, UnsupportedPair, Vanilla

DISTILLERS: dict[str, type[Distiller]] = {}


def register(cls: type[Distiller]) -> type[Distiller]:
    """Class decorator: add a method to the registry under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in DISTILLERS and DISTILLERS[cls.name] is not cls:
        warnings.warn(f"distiller '{cls.name}' registered twice ({DISTILLERS[cls.name].__module__} "
                      f"and {cls.__module__}); the later one wins")
    DISTILLERS[cls.name] = cls
    return cls


register(Vanilla)


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()


def get_distiller_class(method: str) -> type[Distiller]:
    if method not in DISTILLERS:
        import difflib
        close = difflib.get_close_matches(method, list(DISTILLERS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"distill.method: unknown method '{method}'{hint} "
                          f"(available: {', '.join(sorted(DISTILLERS))})")
    return DISTILLERS[method]


def build_params(method: str, params: dict):
    """The method's `Params` dataclass from `distill.params`, strictly validated."""
    return from_dict(get_distiller_class(method).Params, params, "distill.params.")


__all__ = ["DISTILLERS", "Distiller", "LogitDistiller", "Needs", "NoParams", "UnsupportedPair",
           "register", "get_distiller_class", "build_params"]
