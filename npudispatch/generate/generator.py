"""The generate loop over resident prefill/decode programs (see the package docstring)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from npudispatch.errors import BackendUnavailableError, ModelError
from npudispatch.generate.config import GenaiConfig
from npudispatch.generate.programs import CompiledPhase, check_shared_cache, compile_phase
from npudispatch.generate.resident import PhaseStats, ResidentDevice
from npudispatch.generate.sampling import SearchOptions, next_token
from npudispatch.precision import Precision, resolve_precision
from npudispatch.progress import progress

__all__ = ["GenerationResult", "Generator"]

#: Default prefill length: longer prompts continue token by token through the decode program.
DEFAULT_PREFILL = 64


@dataclass
class GenerationResult:
    """One ``generate`` call: tokens, why it stopped, timings and bytes moved per step."""

    tokens: list[int]
    prompt_length: int
    stop_reason: str  # "eos", "max_length" or "max_new_tokens"
    prefill_seconds: float
    decode_seconds: list[float] = field(default_factory=list)
    bytes_per_step: list[int] = field(default_factory=list)  # copied per decode step
    kernel_calls_per_step: list[int] = field(default_factory=list)
    prefill_bytes: int = 0
    prefill_kernel_calls: int = 0

    @property
    def new_tokens(self) -> list[int]:
        return self.tokens[self.prompt_length :]

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput (new tokens after the first / decode time)."""
        total = sum(self.decode_seconds)
        return len(self.decode_seconds) / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "new_tokens": self.new_tokens,
            "prompt_length": self.prompt_length,
            "stop_reason": self.stop_reason,
            "prefill_seconds": self.prefill_seconds,
            "prefill_bytes_copied": self.prefill_bytes,
            "prefill_kernel_calls": self.prefill_kernel_calls,
            "decode_steps": len(self.decode_seconds),
            "decode_seconds": self.decode_seconds,
            "tokens_per_second": self.tokens_per_second,
            "bytes_per_decode_step": self.bytes_per_step,
            "kernel_calls_per_decode_step": self.kernel_calls_per_step,
        }


class Generator:
    """Text generation with an onnxruntime-genai decoder folder on the NPU (emulator backend).

    Compiles a prefill program (``prefill_length`` tokens) and a decode program (one token) once,
    keeps both resident on one device context sharing one weight image, and keeps the KV cache
    (``max_length`` rows, default the config's ``search.max_length``) on the device across steps.
    ``precision`` is the compute precision (:data:`~npudispatch.precision.Precision`):
    ``"bf16"`` (default) stores activations and the cache in bf16; ``"mixed"`` keeps activations
    float32 and the cache bf16, rounding only matmul and attention operands (closer to
    onnxruntime-genai, ``docs/numerics.md`` §1.5); ``"fp32"`` (``bf16=False``, ``--fp32``) stores
    and computes in float32. ``backend="xrt"`` (options as for
    :class:`~npudispatch.dispatch.backends.xrt.XrtBackend`, e.g. ``xclbin=``) runs both programs in
    one XRT hardware context instead of the emulator.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        bf16: bool = True,
        precision: Precision | None = None,
        max_length: int | None = None,
        prefill_length: int | None = None,
        backend: str = "emulator",
        **backend_options: Any,
    ) -> None:
        if backend not in ("emulator", "xrt"):
            raise BackendUnavailableError(
                f"unknown backend {backend!r} for resident programs: use 'emulator' or 'xrt'"
            )
        if backend == "emulator" and backend_options:
            raise BackendUnavailableError(
                f"the emulator takes no backend options, got {sorted(backend_options)}"
            )
        self.config = cfg = GenaiConfig.from_dir(model_dir)
        signature = cfg.signature()
        self.max_length = int(max_length or cfg.search.max_length or cfg.context_length)
        if not 2 <= self.max_length <= cfg.context_length:
            raise ModelError(
                f"max_length {self.max_length} must be in [2, context_length="
                f"{cfg.context_length}] of {cfg.model_dir}"
            )
        self.prefill_length = int(prefill_length or min(DEFAULT_PREFILL, self.max_length - 1))
        if not 1 <= self.prefill_length < self.max_length:
            raise ModelError(
                f"prefill_length {self.prefill_length} must be in [1, max_length - 1 = "
                f"{self.max_length - 1}]"
            )
        self.precision = resolve_precision(precision, bf16)
        t0 = time.perf_counter()
        common = {"cache_len": self.max_length, "precision": self.precision}
        self.prefill = compile_phase(
            cfg, signature, "prefill", seq_len=self.prefill_length,
            mask_len=self.prefill_length, **common,
        )  # fmt: skip
        self.decode = compile_phase(
            cfg, signature, "decode", seq_len=1, mask_len=self.max_length, **common
        )
        check_shared_cache(self.prefill, self.decode)
        xrt = None
        if backend == "xrt":
            from npudispatch.dispatch.backends.xrt import XrtBackend

            xrt = XrtBackend(**backend_options)  # one hardware context for both programs
        self.device = ResidentDevice({"prefill": self.prefill, "decode": self.decode}, xrt)
        self.compile_seconds = time.perf_counter() - t0

    @property
    def phases(self) -> dict[str, CompiledPhase]:
        return {"prefill": self.prefill, "decode": self.decode}

    # ---- one model call --------------------------------------------------------------------

    def _check_prompt(self, ids: Sequence[int]) -> list[int]:
        tokens = [int(t) for t in ids]
        if not tokens:
            raise ModelError("the prompt is empty: pass at least one token id")
        bad = [t for t in tokens if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ModelError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})"
            )
        if len(tokens) >= self.max_length:
            raise ModelError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.max_length} "
                f"(max_length; context_length {self.config.context_length}): shorten the prompt "
                "or raise max_length"
            )
        return tokens

    def _prefill(self, tokens: list[int]) -> tuple[np.ndarray, PhaseStats]:
        """Logits ``[n, V]`` of the first ``n = min(len, prefill_length)`` tokens."""
        n = min(len(tokens), self.prefill_length)
        ids = np.full((1, self.prefill_length), self.config.pad_token_id, np.int64)
        ids[0, :n] = tokens[:n]
        mask = np.zeros((1, self.prefill_length), np.int64)
        mask[0, :n] = 1
        cfg = self.config
        outs, stats = self.device.run("prefill", {cfg.input_ids: ids, cfg.attention_mask: mask})
        return np.asarray(outs[cfg.logits])[0, :n], stats

    def _decode(self, token: int, position: int) -> tuple[np.ndarray, PhaseStats]:
        """Logits ``[V]`` after feeding ``token`` at ``position`` (cache holds 0..position-1)."""
        cfg = self.config
        mask = np.zeros((1, self.max_length), np.int64)
        mask[0, : position + 1] = 1
        feeds = {cfg.input_ids: np.asarray([[token]], np.int64), cfg.attention_mask: mask}
        outs, stats = self.device.run("decode", feeds)
        return np.asarray(outs[cfg.logits])[0, -1], stats

    def _consume(self, tokens: list[int]) -> tuple[np.ndarray, PhaseStats, list[np.ndarray]]:
        """Run the whole prompt (prefill, then decode steps past ``prefill_length``)."""
        rows, stats = self._prefill(tokens)
        per_position = list(rows)
        for pos in range(self.prefill_length, len(tokens)):
            row, step = self._decode(tokens[pos], pos)
            per_position.append(row)
            stats.kernel_calls += step.kernel_calls
            stats.bytes_to_device += step.bytes_to_device
            stats.bytes_from_device += step.bytes_from_device
        return per_position[-1], stats, per_position

    def teacher_forced_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits ``[len(ids), V]`` for every position of ``ids`` (parity checks)."""
        tokens = self._check_prompt(ids)
        return np.stack(self._consume(tokens)[2])

    # ---- the loop --------------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int | None = None,
        options: SearchOptions | None = None,
        show_progress: bool | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Generate after ``prompt_ids`` until EOS, ``max_length`` or ``max_new_tokens``."""
        tokens = self._check_prompt(prompt_ids)
        options = options or SearchOptions(
            do_sample=self.config.search.do_sample,
            top_k=self.config.search.top_k,
            top_p=self.config.search.top_p,
            temperature=self.config.search.temperature,
        )
        budget = self.max_length - len(tokens)
        if max_new_tokens is not None:
            if max_new_tokens < 1:
                raise ModelError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
            budget = min(budget, max_new_tokens)
        rng = np.random.default_rng(options.seed)
        eos = set(self.config.eos_token_ids)
        t0 = time.perf_counter()
        logits, pre_stats, _ = self._consume(tokens)
        result = GenerationResult(
            tokens=tokens,
            prompt_length=len(tokens),
            stop_reason="max_new_tokens",
            prefill_seconds=time.perf_counter() - t0,
            prefill_bytes=pre_stats.bytes_copied,
            prefill_kernel_calls=pre_stats.kernel_calls,
        )
        for i in progress(range(budget), desc="generate", enabled=show_progress, unit="tok"):
            token = next_token(logits, options, rng)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in eos:
                result.stop_reason = "eos"
                break
            if len(tokens) >= self.max_length:
                result.stop_reason = "max_length"
                break
            if i == budget - 1:
                break  # the last token needs no forward pass
            t1 = time.perf_counter()
            logits, step = self._decode(token, len(tokens) - 1)
            result.decode_seconds.append(time.perf_counter() - t1)
            result.bytes_per_step.append(step.bytes_copied)
            result.kernel_calls_per_step.append(step.kernel_calls)
        return result
