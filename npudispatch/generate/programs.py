"""Compile a genai decoder twice — a prefill and a decode program — for a resident KV cache.

Both compilations use a *static* cache: every layer's past and present KV is ``[1, kv_heads,
L, head_size]`` with ``L = max_length``, GroupQueryAttention writes its present buffer over its
past input (:func:`~npudispatch.operators.inplace.mark_inplace`), and the present outputs leave
the graph, so the cache never crosses to the host. The past inputs are moved to the front of the
graph inputs, which puts them at the start of the input buffer at the same offsets in both
programs: the two programs read and write one cache.

* prefill: ``input_ids [1, P]`` (the prompt, right-padded), ``attention_mask [1, P]``; a first
  prompt for GroupQueryAttention (rows start at 0, padded rows never reach real ones);
* decode: ``input_ids [1, 1]``, ``attention_mask [1, L]`` (ones up to the new token).

Unless in float32 compute the cache is stored in bf16 (it never leaves the device, so its dtype is
the device's choice); the graph computes in the chosen precision as any compiled model does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from npudispatch import graph
from npudispatch.dispatch.compile import CompiledModel, compile_model
from npudispatch.dispatch.emit import FusedProgram
from npudispatch.errors import ModelError, PlanError
from npudispatch.generate.config import GenaiConfig, ModelSignature
from npudispatch.operators.inplace import inplace_pairs, mark_inplace
from npudispatch.precision import Precision

__all__ = ["CompiledPhase", "compile_phase", "phase_dims"]


@dataclass
class CompiledPhase:
    """One phase (prefill or decode): the compiled model and the names the runner feeds."""

    name: str
    compiled: CompiledModel
    seq_len: int  # input_ids length
    mask_len: int  # attention_mask length
    cache_names: list[str]  # resident inputs (past KV), never copied per step

    @property
    def programs(self) -> list[FusedProgram]:
        return [self.compiled.programs[i] for i in sorted(self.compiled.programs)]


def phase_dims(sig: ModelSignature, cfg: GenaiConfig, seq: int, mask: int, cache: int) -> dict:
    """Symbolic dim bindings of one phase (integers in the signature are already fixed)."""
    dims: dict[str, int] = {}
    for name, value in (
        (sig.batch, 1),
        (sig.sequence, seq),
        (sig.total_sequence, mask),
        (sig.past_sequence, cache),
        (sig.head_dim, cfg.head_size),
    ):
        if isinstance(name, str) and name:
            if dims.get(name, value) != value:
                raise ModelError(
                    f"dim {name!r} names two different sizes ({dims[name]} and {value}); the "
                    "decoder must use distinct dims for sequence, total and past lengths"
                )
            dims[name] = value
    return dims


def _attention_of(value: ir.Value, name: str) -> ir.Node:
    users = {u.node for u in value.uses()}
    gqa = [n for n in users if n.op_type == "GroupQueryAttention"]
    if len(users) != 1 or not gqa:
        kinds = sorted(n.op_type for n in users)
        raise ModelError(
            f"KV input {name!r} is read by {kinds}, not by one GroupQueryAttention: generate keeps "
            "the cache resident only for GroupQueryAttention decoders (onnxruntime-genai builder)"
        )
    return gqa[0]


def _make_resident(
    model: ir.Model, cfg: GenaiConfig, cache_len: int, precision: Precision
) -> list[str]:
    """Static-cache, in-place form of the loaded decoder; returns the resident input names.

    The cache is bf16 unless in float32 compute: mixed compute stores the keys and values bf16 too,
    since attention rounds them to bf16 as MAC operands whenever it reads them (same results,
    half the bytes)."""
    g = model.graph
    by_name = {v.name: v for v in g.inputs}
    kv_dtype = ir.DataType.FLOAT if precision == "fp32" else ir.DataType.BFLOAT16
    shape = ir.Shape([1, cfg.kv_heads, cache_len, cfg.head_size])
    present = set(cfg.present_names())
    resident: list[str] = []
    for layer in range(cfg.num_layers):
        k_name, v_name = cfg.kv_pair(layer, past=True)
        k_in, v_in = by_name[k_name], by_name[v_name]
        node = _attention_of(k_in, k_name)
        if node.inputs[3] is not k_in or node.inputs[4] is not v_in:
            raise ModelError(f"{node.name}: past inputs are not {k_name!r} / {v_name!r}")
        for value in (k_in, v_in, node.outputs[1], node.outputs[2]):
            value.dtype = kv_dtype
            value.shape = shape
        mark_inplace(node, {1: 3, 2: 4})
        resident += [k_name, v_name]
    kept = [v for v in g.outputs if v.name not in present]
    g.outputs.clear()
    g.outputs.extend(kept)
    order = [by_name[n] for n in resident] + [v for v in g.inputs if v.name not in resident]
    g.inputs.clear()
    g.inputs.extend(order)
    return resident


def compile_phase(
    cfg: GenaiConfig,
    sig: ModelSignature,
    name: str,
    *,
    seq_len: int,
    mask_len: int,
    cache_len: int,
    precision: Precision,
) -> CompiledPhase:
    """Load and compile the decoder for one phase with a resident ``cache_len``-row cache."""
    dims = phase_dims(sig, cfg, seq_len, mask_len, cache_len)
    model = graph.load(cfg.model_path, dims=dims)
    resident = _make_resident(model, cfg, cache_len, precision)
    compiled = compile_model(model, precision=precision)
    part_inputs = {v.name for p in compiled.partitions if p.kind == "cpu" for v in p.inputs}
    on_cpu = sorted(part_inputs & set(resident))
    if on_cpu:
        raise PlanError(
            f"{name}: KV inputs {on_cpu} are read on the CPU, so the cache cannot stay on the "
            "device; see the partition report (npudispatch inspect) for the node that declined"
        )
    for node in compiled.model.graph:
        if node.op_type == "GroupQueryAttention" and len(inplace_pairs(node)) != 2:
            raise PlanError(
                f"{name}: {node.name} cannot write its present KV over its past KV in place "
                "(shape, dtype or readers differ); the cache would not stay resident"
            )
    return CompiledPhase(name, compiled, seq_len, mask_len, resident)


def check_shared_cache(a: CompiledPhase, b: CompiledPhase) -> None:
    """The two phases must place every cache tensor at the same input-buffer bytes."""
    if len(a.programs) != len(b.programs):
        raise PlanError(
            f"{a.name} compiles to {len(a.programs)} NPU programs and {b.name} to "
            f"{len(b.programs)}: the phases must partition alike to share a cache"
        )
    for pa, pb in zip(a.programs, b.programs):
        ba = {x.name: x for x in pa.inputs}
        bb = {x.name: x for x in pb.inputs}
        for n in set(a.cache_names) & (set(ba) | set(bb)):
            xa, xb = ba.get(n), bb.get(n)
            if (
                xa is None
                or xb is None
                or (xa.buffer, xa.offset, xa.nbytes)
                != (
                    xb.buffer,
                    xb.offset,
                    xb.nbytes,
                )
            ):
                raise PlanError(
                    f"cache tensor {n!r} is placed differently by {a.name} ({xa}) and {b.name} "
                    f"({xb}); both programs must share its bytes"
                )
        if not np.array_equal(
            np.frombuffer(pa.const_image, np.uint8), np.frombuffer(pb.const_image, np.uint8)
        ):
            raise PlanError(
                f"programs {pa.name} of {a.name} and {b.name} have different const images; "
                "they cannot share one weight buffer"
            )
