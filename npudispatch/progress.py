"""One tqdm helper for long work (compiling big models, weight formatting, benchmark loops).

Bars go to stderr and are silent when stderr is not a terminal (pipes, CI logs, notebooks run
by nbclient), when the environment sets ``NPUD_PROGRESS=0``, or when the caller disables them.
``NPUD_PROGRESS=1`` forces them on (e.g. to see them through ``tee``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

__all__ = ["ENV_VAR", "progress", "progress_enabled"]

T = TypeVar("T")

#: Environment variable switching bars off (``0``) or forcing them on (``1``).
ENV_VAR = "NPUD_PROGRESS"


def progress_enabled(enabled: bool | None = None) -> bool:
    """Whether a bar would be drawn: ``enabled`` if given, else ``NPUD_PROGRESS``, else a TTY.

    An explicit ``enabled=False`` always wins; ``NPUD_PROGRESS=0`` beats ``enabled=None`` and
    ``enabled=True`` alike, so a user can silence every bar of a library call from outside.
    """
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if enabled is False or env in ("0", "false", "no", "off"):
        return False
    if enabled is True or env in ("1", "true", "yes", "on"):
        return True
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str | None = None,
    enabled: bool | None = None,
    **tqdm_kwargs: object,
) -> Iterator[T]:
    """Iterate ``iterable`` with a tqdm bar on stderr when :func:`progress_enabled` says so.

    ``total`` defaults to ``len(iterable)`` when it has one; extra keyword arguments go to tqdm
    (``unit``, ``leave``...). When disabled this yields the items of ``iterable`` unchanged.
    """
    if not progress_enabled(enabled):
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = tqdm(iterable, total=total, desc=desc, file=sys.stderr, **tqdm_kwargs)
    try:
        yield from bar
    finally:
        bar.close()
