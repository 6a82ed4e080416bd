"""Backends by name: each backend declares its options and checks them itself.

A :class:`BackendSpec` names a backend, lists the options it takes (and which it requires), knows
how to validate them and how to create the backend. The built-in backends (``emulator``, ``xrt``)
define their spec in their own module (``SPEC``), imported on first use so that asking for the
emulator never imports the xrt module's dependencies; other backends call
:func:`register_backend`. Messages name an option the way the caller spells it: a Python keyword
(``xclbin=``) by default, a command-line flag (``--xclbin``) when the CLI checks its arguments.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from npudispatch.dispatch.backends.base import Backend
from npudispatch.errors import BackendUnavailableError

__all__ = [
    "BackendSpec",
    "OptionNamer",
    "backend_names",
    "backend_spec",
    "cli_flag",
    "get_backend",
    "python_keyword",
    "register_backend",
]

OptionNamer = Callable[[str], str]
"""How an option is spelled in messages: :func:`python_keyword` or :func:`cli_flag`."""


def python_keyword(option: str) -> str:
    """``xclbin=``: an option as a keyword argument of ``Session`` / ``get_backend``."""
    return f"{option}="


def cli_flag(option: str) -> str:
    """``--xclbin``: an option as a command-line flag."""
    return "--" + option.replace("_", "-")


def _selecting(backend: str, name: OptionNamer) -> str:
    """How the caller picks ``backend``: ``--backend xrt`` or ``backend='xrt'``."""
    return f"--backend {backend}" if name is cli_flag else f"backend={backend!r}"


@dataclass(frozen=True)
class BackendSpec:
    """One backend: ``create(**options)`` makes it after :meth:`check` accepted the options.

    ``options`` are every option name it takes, ``required`` those it cannot do without;
    ``validate(options, name)`` raises :class:`BackendUnavailableError` for a bad value, naming
    the option with ``name(option)``.
    """

    name: str
    summary: str
    create: Callable[..., Backend]
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    validate: Callable[[Mapping[str, Any], OptionNamer], None] | None = None

    def check(self, options: Mapping[str, Any], name: OptionNamer = python_keyword) -> None:
        """Raise :class:`BackendUnavailableError` unless ``options`` suit this backend."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = (
                f"it takes {', '.join(name(o) for o in self.options)}"
                if self.options
                else "it takes no options"
            )
            users = [
                other
                for other in backend_names()
                if other != self.name and set(unknown) <= set(backend_spec(other).options)
            ]
            hint = f"; {name(unknown[0])} is for {_selecting(users[0], name)}" if users else ""
            raise BackendUnavailableError(
                f"the {self.name!r} backend does not take {', '.join(map(name, unknown))} "
                f"({takes}){hint}"
            )
        missing = [o for o in self.required if options.get(o) is None]
        if missing:
            raise BackendUnavailableError(
                f"the {self.name!r} backend needs {', '.join(map(name, missing))} ({self.summary})"
            )
        if self.validate is not None:
            self.validate(options, name)


# Built-in backends: the module that defines each one's SPEC (imported on first use).
_BUILTIN = {
    "emulator": "npudispatch.dispatch.backends.emulator",
    "xrt": "npudispatch.dispatch.backends.xrt",
}
_SPECS: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec, *, replace: bool = False) -> BackendSpec:
    """Make ``spec`` available by its name (refuses to replace another one silently)."""
    if spec.name in _SPECS and _SPECS[spec.name] is not spec and not replace:
        raise ValueError(f"a backend named {spec.name!r} is already registered; pass replace=True")
    _SPECS[spec.name] = spec
    return spec


def backend_names() -> tuple[str, ...]:
    """Every backend name: the built-in ones first, then registered ones."""
    return tuple(dict.fromkeys([*_BUILTIN, *_SPECS]))


def backend_spec(name: str) -> BackendSpec:
    """The spec of backend ``name`` (:class:`BackendUnavailableError` for an unknown name)."""
    if name not in _SPECS and name in _BUILTIN:
        module = importlib.import_module(_BUILTIN[name])
        register_backend(module.SPEC)
    spec = _SPECS.get(name)
    if spec is None:
        raise BackendUnavailableError(
            f"unknown backend {name!r}; choose one of {', '.join(backend_names())}"
        )
    return spec


def get_backend(name: str = "emulator", **options: Any) -> Backend:
    """Create backend ``name`` with its ``options``, checked by the backend's own spec."""
    spec = backend_spec(name)
    spec.check(options)
    return spec.create(**options)
