"""ONNX operator domains: one convention for the default domain.

onnx_ir stores the default ONNX domain as ``""`` (it normalizes ``"ai.onnx"`` on the way in), but
protos, user-written op-type pairs and older models may spell it ``"ai.onnx"``. Compare domains
with :func:`normalize_domain` / :func:`is_onnx_domain`; show them with :func:`domain_label`.
A leaf module: every layer may import it.
"""

from __future__ import annotations

__all__ = ["ONNX_DOMAIN", "domain_label", "is_onnx_domain", "normalize_domain"]

ONNX_DOMAIN = ""
_ALIASES = frozenset({"", "ai.onnx"})


def normalize_domain(domain: str | None) -> str:
    """``""`` for the default ONNX domain however it is spelled, else ``domain`` unchanged."""
    return ONNX_DOMAIN if not domain or domain in _ALIASES else domain


def is_onnx_domain(domain: str | None) -> bool:
    """True for the default ONNX domain (``""``, ``"ai.onnx"`` or None)."""
    return normalize_domain(domain) == ONNX_DOMAIN


def domain_label(domain: str | None) -> str:
    """How reports show a domain: ``"ai.onnx"`` for the default domain, else the domain."""
    return "ai.onnx" if is_onnx_domain(domain) else str(domain)
