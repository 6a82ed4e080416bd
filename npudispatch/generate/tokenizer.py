"""Prompt text ↔ token ids through onnxruntime-genai's tokenizer (optional extra ``genai``).

onnxruntime-genai reads the folder's ``tokenizer.json`` / ``tokenizer_config.json`` and maps a
piece of text it has no vocabulary entry for to ``-1`` instead of failing; special tokens may also
map past the model's ``vocab_size``. Feeding such ids to the model would be an embedding lookup
out of range, so :meth:`PromptTokenizer.encode` refuses them and says why, from the file itself:
a folder whose ``tokenizer.json`` is a placeholder (a vocabulary of opaque names with no merges,
no ``unk_token`` and none of the byte-level symbols ordinary text is split into, as in the
shared tiny Qwen2 folders) cannot encode any text, only ``--prompt-ids`` work there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npudispatch.errors import ModelError
from npudispatch.generate.config import GenaiConfig

TOKENIZER_FILE = "tokenizer.json"
_BYTE_LEVEL_SYMBOLS = 256  # the ByteLevel pre-tokenizer writes every byte as one of 256 symbols


def _byte_level_alphabet() -> set[str]:
    """The 256 symbols GPT-2 style ByteLevel pre-tokenizers map bytes to."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, extra = [], 0
    for b in range(_BYTE_LEVEL_SYMBOLS):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(_BYTE_LEVEL_SYMBOLS + extra))
            extra += 1
    return set(symbols)


def describe_tokenizer_file(path: Path, vocab_size: int) -> str:
    """One sentence on what ``tokenizer.json`` holds that matters for encoding text (its model
    type, vocabulary size and first entries, merges, ``unk_token``, byte-level coverage, special
    tokens past ``vocab_size``); empty if the file cannot be read as a tokenizers JSON."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        model = doc["model"]
        vocab: dict[str, int] = dict(model.get("vocab") or {})
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    first = ", ".join(repr(t) for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])[:3])
    parts = [f"its {model.get('type', '?')} model has {len(vocab)} entries ({first}, ...)"]
    if "merges" in model:
        parts.append(f"{len(model.get('merges') or [])} merges")
    parts.append(f"unk_token {model.get('unk_token')!r}")
    covered = len(_byte_level_alphabet() & vocab.keys())
    parts.append(f"{covered} of the {_BYTE_LEVEL_SYMBOLS} byte-level symbols")
    past = [
        f"{t.get('content')!r}={t.get('id')}"
        for t in doc.get("added_tokens") or []
        if isinstance(t.get("id"), int) and t["id"] >= vocab_size
    ]
    if past:
        parts.append(f"special tokens past the model's vocab_size {vocab_size}: {', '.join(past)}")
    return "; ".join(parts)


@dataclass
class PromptTokenizer:
    """onnxruntime-genai's tokenizer of a model folder, checked against the model's vocabulary."""

    model_dir: Path
    vocab_size: int
    _tokenizer: Any

    @classmethod
    def load(cls, model_dir: str | Path) -> PromptTokenizer:
        """The folder's tokenizer; :class:`ModelError` when onnxruntime-genai or the file is
        missing (both messages say to pass ``--prompt-ids`` instead)."""
        model_dir = Path(model_dir)
        config = GenaiConfig.from_dir(model_dir)
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise ModelError(
                "--prompt needs onnxruntime-genai's tokenizer (pip install -e '.[genai]' or "
                "pip install onnxruntime-genai); pass --prompt-ids instead"
            ) from None
        if not (model_dir / TOKENIZER_FILE).is_file():
            raise ModelError(f"{model_dir} has no {TOKENIZER_FILE}: pass --prompt-ids instead")
        tokenizer = og.Tokenizer(og.Model(str(model_dir)))
        return cls(model_dir, config.vocab_size, tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; :class:`ModelError` naming the file, the pieces it could not
        encode and what to do when any id is unknown (-1) or past the model's vocabulary."""
        ids = [int(t) for t in self._tokenizer.encode(text)]
        unknown = sum(1 for t in ids if t < 0)
        past = sorted({t for t in ids if t >= self.vocab_size})
        if not ids:
            raise ModelError(f"the prompt {text!r} encodes to no tokens: pass --prompt-ids")
        if not unknown and not past:
            return ids
        path = self.model_dir / TOKENIZER_FILE
        problems = []
        if unknown:
            words = [w for w in text.split() if any(int(t) < 0 for t in self._tokenizer.encode(w))]
            shown = ", ".join(repr(w) for w in words[:5]) or repr(text)
            problems.append(
                f"{unknown} of its {len(ids)} pieces have no vocabulary entry (id -1; in {shown})"
            )
        if past:
            problems.append(f"ids {past[:5]} are past the model's vocab_size {self.vocab_size}")
        about = describe_tokenizer_file(path, self.vocab_size)
        raise ModelError(
            f"--prompt: {path} cannot encode {text!r} for this model: onnxruntime-genai's "
            f"tokenizer says {' and '.join(problems)}"
            + (f". The file: {about}" if about else "")
            + ". Pass --prompt-ids, or put the tokenizer files (tokenizer.json, "
            "tokenizer_config.json) of the model this folder was exported from into "
            f"{self.model_dir}"
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return str(self._tokenizer.decode([int(t) for t in ids]))


__all__ = ["PromptTokenizer", "describe_tokenizer_file"]
