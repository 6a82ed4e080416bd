"""``genai_config.json`` of an onnxruntime-genai model folder, read and checked against the model.

Only the decoder-only layout the onnxruntime-genai model builder writes is supported: inputs
``input_ids``, ``attention_mask`` and per-layer past KV named by ``past_key_names`` /
``past_value_names`` (``%d`` = layer), outputs ``logits`` and the present KV names; KV in BNSH
``[batch, kv_heads, sequence, head_size]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from npudispatch.errors import ModelError

CONFIG_FILE = "genai_config.json"

__all__ = ["CONFIG_FILE", "GenaiConfig", "ModelSignature", "SearchDefaults"]


@dataclass(frozen=True)
class SearchDefaults:
    """The ``search`` section: defaults of a generation request."""

    max_length: int
    do_sample: bool = False
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0


@dataclass(frozen=True)
class ModelSignature:
    """The decoder's symbolic dim names, read from the ONNX graph inputs."""

    batch: str | int
    sequence: str | int
    total_sequence: str | int
    past_sequence: str | int
    head_dim: str | int


@dataclass(frozen=True)
class GenaiConfig:
    """What the generator needs from ``genai_config.json`` (names, sizes, special tokens)."""

    model_dir: Path
    filename: str
    context_length: int
    num_layers: int
    num_heads: int
    kv_heads: int
    head_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    input_ids: str
    attention_mask: str
    past_key_names: str
    past_value_names: str
    logits: str
    present_key_names: str
    present_value_names: str
    search: SearchDefaults
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def model_path(self) -> Path:
        return self.model_dir / self.filename

    def past_names(self) -> list[str]:
        """Past KV input names, keys then values per layer (layer order)."""
        return [n for i in range(self.num_layers) for n in self.kv_pair(i, past=True)]

    def present_names(self) -> list[str]:
        return [n for i in range(self.num_layers) for n in self.kv_pair(i, past=False)]

    def kv_pair(self, layer: int, *, past: bool) -> tuple[str, str]:
        k, v = (
            (self.past_key_names, self.past_value_names)
            if past
            else (self.present_key_names, self.present_value_names)
        )
        return k % layer, v % layer

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> GenaiConfig:
        """Read ``MODEL_DIR/genai_config.json`` (ModelError naming the problem and the fix)."""
        root = Path(model_dir)
        if not root.is_dir():
            raise ModelError(f"{root} is not a directory: pass an onnxruntime-genai model folder")
        path = root / CONFIG_FILE
        if not path.is_file():
            raise ModelError(
                f"{path} is missing: generate needs an onnxruntime-genai model folder (made by "
                "the onnxruntime-genai model builder) with genai_config.json beside model.onnx"
            )
        try:
            raw = json.loads(path.read_text())
            model = raw["model"]
            dec = model["decoder"]
            ins, outs = dec["inputs"], dec["outputs"]
            eos = model.get("eos_token_id", [])
            eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
            search = raw.get("search", {})
            context = int(model.get("context_length") or search.get("max_length") or 0)
            cfg = cls(
                model_dir=root,
                filename=str(dec.get("filename", "model.onnx")),
                context_length=context,
                num_layers=int(dec["num_hidden_layers"]),
                num_heads=int(dec["num_attention_heads"]),
                kv_heads=int(dec.get("num_key_value_heads", dec["num_attention_heads"])),
                head_size=int(dec["head_size"]),
                vocab_size=int(model["vocab_size"]),
                eos_token_ids=eos_ids,
                pad_token_id=int(model.get("pad_token_id", eos_ids[0] if eos_ids else 0)),
                input_ids=str(ins.get("input_ids", "input_ids")),
                attention_mask=str(ins.get("attention_mask", "attention_mask")),
                past_key_names=str(ins["past_key_names"]),
                past_value_names=str(ins["past_value_names"]),
                logits=str(outs.get("logits", "logits")),
                present_key_names=str(outs["present_key_names"]),
                present_value_names=str(outs["present_value_names"]),
                search=SearchDefaults(
                    max_length=int(search.get("max_length", context) or context),
                    do_sample=bool(search.get("do_sample", False)),
                    top_k=int(search.get("top_k", 50)),
                    top_p=float(search.get("top_p", 1.0)),
                    temperature=float(search.get("temperature", 1.0)),
                ),
                raw=raw,
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ModelError(
                f"{path}: not a decoder genai_config.json ({type(exc).__name__}: {exc}); it needs "
                "model.decoder.{num_hidden_layers, num_attention_heads, head_size, inputs, "
                "outputs} and model.vocab_size"
            ) from exc
        if cfg.context_length <= 0:
            raise ModelError(f"{path}: model.context_length must be a positive integer")
        if not cfg.model_path.is_file():
            raise ModelError(f"{cfg.model_path} (decoder.filename in {path}) does not exist")
        return cfg

    def signature(self) -> ModelSignature:
        """Check the ONNX graph's inputs/outputs against the genai naming; return its dim names.

        Reads only the graph header (no weights). ModelError lists every missing name and every
        KV input whose shape is not ``[batch, kv_heads, past, head_size]``.
        """
        proto = onnx.load(str(self.model_path), load_external_data=False)
        inputs = {i.name: i for i in proto.graph.input}
        outputs = {o.name for o in proto.graph.output}
        want_in = [self.input_ids, self.attention_mask, *self.past_names()]
        want_out = [self.logits, *self.present_names()]
        missing = [n for n in want_in if n not in inputs] + [
            n for n in want_out if n not in outputs
        ]
        extra = [n for n in inputs if n not in want_in]
        if missing or extra:
            raise ModelError(
                f"{self.model_path}: inputs/outputs do not follow the genai naming of "
                f"{CONFIG_FILE}: missing {missing}, unexpected inputs {extra} (model inputs: "
                f"{list(inputs)}); generate supports decoders with input_ids, attention_mask "
                "and per-layer past KV (position_ids inside GroupQueryAttention)"
            )

        def dims(name: str) -> list[str | int]:
            shape = inputs[name].type.tensor_type.shape.dim
            return [d.dim_param or d.dim_value for d in shape]

        ids, mask = dims(self.input_ids), dims(self.attention_mask)
        if len(ids) != 2 or len(mask) != 2:
            raise ModelError(
                f"{self.model_path}: input_ids and attention_mask must be [batch, seq]"
            )
        kv = [dims(n) for n in self.past_names()]
        for name, shape in zip(self.past_names(), kv):
            head_ok = isinstance(shape[3], str) or shape[3] == self.head_size
            if len(shape) != 4 or shape[1] != self.kv_heads or not head_ok:
                raise ModelError(
                    f"KV cache input {name!r} has shape {shape}, but {CONFIG_FILE} says "
                    f"[batch, {self.kv_heads} kv heads, past, {self.head_size} head size] (BNSH); "
                    "the config and the model disagree"
                )
        return ModelSignature(ids[0], ids[1], mask[1], kv[0][2], kv[0][3])
