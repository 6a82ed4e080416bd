"""Next-token choice: greedy, or top-k / top-p (nucleus) sampling with temperature and a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from npudispatch.errors import ModelError

__all__ = ["SearchOptions", "next_token"]


@dataclass(frozen=True)
class SearchOptions:
    """How to pick tokens. ``do_sample=False`` is greedy (first index of the maximum)."""

    do_sample: bool = False
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ModelError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ModelError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ModelError(f"temperature must be > 0, got {self.temperature}")


def next_token(logits: np.ndarray, options: SearchOptions, rng: np.random.Generator) -> int:
    """The next token id from one row of logits."""
    row = np.asarray(logits, np.float64).reshape(-1)
    if not options.do_sample:
        return int(np.argmax(row))
    scaled = row / options.temperature
    order = np.argsort(-scaled, kind="stable")
    if options.top_k:
        order = order[: options.top_k]
    kept = scaled[order]
    probs = np.exp(kept - kept.max())
    probs /= probs.sum()
    if options.top_p < 1.0:
        # smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(np.cumsum(probs), options.top_p) + 1)
        order, probs = order[:cut], probs[:cut] / probs[:cut].sum()
    return int(order[rng.choice(len(order), p=probs)])
