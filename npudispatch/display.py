"""Rich (notebook) views of core types, without the core types importing their renderers.

A core type sets ``_repr_html_ = display.rich_html``; the renderers live on the presentation side
(:mod:`npudispatch.viz`), which registers them by qualified class name with :func:`register_html`.
The first rich display imports the presentation module, so a notebook needs no extra import, and
nothing in the core imports matplotlib, HTML helpers or the modules those need. A leaf module:
every layer may import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["PRESENTATION_MODULE", "register_html", "rich_html"]

PRESENTATION_MODULE = "npudispatch.viz"
_RENDERERS: dict[str, Callable[[Any], str]] = {}


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_html(qualified_name: str, render: Callable[[Any], str]) -> None:
    """Render instances of the class ``qualified_name`` (``module.Class``) with ``render``."""
    _RENDERERS[qualified_name] = render


def _renderer(obj: Any) -> Callable[[Any], str] | None:
    for cls in type(obj).__mro__:
        if (render := _RENDERERS.get(_key(cls))) is not None:
            return render
    return None


def rich_html(self: Any) -> str | None:
    """``_repr_html_`` of a core type: its registered renderer's HTML (None = plain repr)."""
    render = _renderer(self)
    if render is None:
        importlib.import_module(PRESENTATION_MODULE)  # registers the built-in views
        render = _renderer(self)
    return None if render is None else render(self)
