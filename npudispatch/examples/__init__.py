"""Example models (onnx.ModelProto builders) addressable by name: ``build_example("G11")``.

``EXAMPLES`` maps a name to a builder taking keyword arguments only. Other packages add entries
with :func:`register`; the CLI command ``npudispatch example NAME -o FILE`` saves any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx

from npudispatch.examples.exporter import bert_encoder_layer, llama_decoder_layer
from npudispatch.examples.golden import GOLDEN
from npudispatch.examples.llama import llama2_mlp, llama2_mlp_small

__all__ = ["EXAMPLES", "build_example", "register"]

Builder = Callable[..., onnx.ModelProto]

#: Every example by name: DD's golden graphs "G1".."G20" (G18 split in five), the llama2 MLP and
#: exporter-style transformer layers (torch.onnx.export-shaped, symbolic batch/sequence dims).
EXAMPLES: dict[str, Builder] = {
    **GOLDEN,
    "llama2-mlp": llama2_mlp,
    "llama2-mlp-small": llama2_mlp_small,
    "llama-decoder-layer": llama_decoder_layer,
    "bert-encoder-layer": bert_encoder_layer,
}


def register(name: str, builder: Builder) -> None:
    """Add ``builder`` under ``name``; a name can be registered once."""
    if name in EXAMPLES:
        raise KeyError(f"example {name!r} is already registered")
    EXAMPLES[name] = builder


def build_example(name: str, **kw: Any) -> onnx.ModelProto:
    """Build the example ``name`` with builder keyword arguments ``kw`` (e.g. ``seed=1``)."""
    try:
        builder = EXAMPLES[name]
    except KeyError:
        raise KeyError(f"unknown example {name!r}; known: {', '.join(EXAMPLES)}") from None
    return builder(**kw)
