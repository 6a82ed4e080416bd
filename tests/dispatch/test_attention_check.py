"""run --check on attention: the rounding-aware reference computes GroupQueryAttention,
MultiHeadAttention and Attention-23 the way the kernels do (dispatch/attention_reference.py), so
the NPU's outputs sit far inside the check's limits in bf16 and mixed compute, while a wrong
result (the attention scale 1 % off, a corrupted present key row) still fails. The expansion
itself, without its rounding points, is held to onnxruntime's own attention operators."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from corpus_util import MODELS_DIR
from onnx import TensorProto, helper

from npudispatch.dispatch import attention_reference
from npudispatch.dispatch.check import RMS_ULPS, RoundingReference, check_outputs
from npudispatch.dispatch.session import Session

F32, I32 = TensorProto.FLOAT, TensorProto.INT32
MARGIN = RMS_ULPS / 4  # a kernel-faithful reference leaves only float32 order: far below the limit


def _model(op, domain, inputs, outputs, inits=None, opset=23, **attrs) -> onnx.ModelProto:
    """One-node model; ``inputs``: ``(name, elem_type, shape)`` or None (absent)."""
    inits = inits or {}
    node = helper.make_node(
        op, [i[0] if i else "" for i in inputs], [o[0] for o in outputs], domain=domain,
        name=f"{op.lower()}_0", **attrs,
    )  # fmt: skip
    g_in = [helper.make_tensor_value_info(*i) for i in inputs if i and i[0] not in inits]
    g_out = [helper.make_tensor_value_info(*o) for o in outputs]
    tensors = [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    graph = helper.make_graph([node], "g", g_in, g_out, initializer=tensors)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _rope(max_pos: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (10000 ** (np.arange(half) / half))
    ang = np.arange(max_pos)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _gqa(
    *, b=1, s=7, n=6, g=2, h=16, past=0, present=None, seqlens, total, packed=True, rotary=True,
    interleaved=0, window=-1, softcap=0.0, scale=0.0, smooth=0, half=None, seed=0, opset=23,
):  # fmt: skip
    rng = np.random.default_rng(seed)
    present = present or max(past, total)
    inputs: list = []
    feeds: dict = {}
    if packed:
        inputs += [("qkv", F32, [b, s, (n + 2 * g) * h]), None, None]
    else:
        inputs += [("q", F32, [b, s, n * h]), ("k", F32, [b, s, g * h]), ("v", F32, [b, s, g * h])]
    if past:
        inputs += [("pk", F32, [b, g, past, h]), ("pv", F32, [b, g, past, h])]
    else:
        inputs += [None, None]
    inputs += [("seqlens_k", I32, [b]), ("total", I32, [])]
    for name, _, shape in (i for i in inputs if i):
        feeds[name] = rng.standard_normal(shape).astype(np.float32)
    feeds["seqlens_k"] = np.asarray(seqlens, np.int32)
    feeds["total"] = np.asarray(total, np.int32)
    inits = {}
    if rotary:
        cos, sin = _rope(256, half or h // 2)
        inputs += [("cos", F32, list(cos.shape)), ("sin", F32, list(sin.shape))]
        inits = {"cos": cos, "sin": sin}
    outputs = [("y", F32, [b, s, n * h]), ("pk_out", F32, [b, g, present, h]),
               ("pv_out", F32, [b, g, present, h])]  # fmt: skip
    model = _model(
        "GroupQueryAttention", "com.microsoft", inputs, outputs, inits, num_heads=n,
        kv_num_heads=g, do_rotary=int(rotary), rotary_interleaved=interleaved,
        local_window_size=window, softcap=softcap, scale=scale, smooth_softmax=smooth, opset=opset,
    )  # fmt: skip
    return model, feeds


def _mha(*, b=2, s=5, n=4, h=8, past=6, seed=9, padded=3, causal=1):
    d, t = n * h, past + s
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t), np.int32)
    mask[1, :padded] = 0  # left padding of the second sequence (all of it: a fully padded row)
    model = _model(
        "MultiHeadAttention", "com.microsoft",
        [("q", F32, [b, s, d]), ("k", F32, [b, s, d]), ("v", F32, [b, s, d]), ("bias", F32, [3 * d]),
         ("mask", I32, [b, t]), ("abias", F32, [1, n, s, t]), ("pk", F32, [b, n, past, h]),
         ("pv", F32, [b, n, past, h])],
        [("y", F32, [b, s, d]), ("pko", F32, [b, n, t, h]), ("pvo", F32, [b, n, t, h])],
        {"bias": rng.standard_normal(3 * d).astype(np.float32)}, num_heads=n,
        unidirectional=causal,
    )  # fmt: skip
    feeds = {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in (("q", (b, s, d)), ("k", (b, s, d)), ("v", (b, s, d)),
                            ("abias", (1, n, s, t)), ("pk", (b, n, past, h)), ("pv", (b, n, past, h)))
    }  # fmt: skip
    return model, feeds | {"mask": mask}


def _attention(*, rank=3, causal=1, softcap=0.0, mask=True, b=2, s=5, qn=4, kvn=2, h=8, past=3):
    t = past + s
    rng = np.random.default_rng(10 + rank)
    q_shape, kv_shape = ([b, s, qn * h], [b, s, kvn * h]) if rank == 3 else ([b, qn, s, h], [b, kvn, s, h])  # fmt: skip
    inputs = [("q", F32, q_shape), ("k", F32, kv_shape), ("v", F32, kv_shape)]
    inputs += [("mask", F32, [b, 1, s, t])] if mask else [None]
    if past:
        inputs += [("pk", F32, [b, kvn, past, h]), ("pv", F32, [b, kvn, past, h])]
    y_shape = [b, s, qn * h] if rank == 3 else [b, qn, s, h]
    attrs = {"q_num_heads": qn, "kv_num_heads": kvn} if rank == 3 else {}
    if softcap:
        attrs["softcap"] = softcap
    model = _model(
        "Attention", "", inputs,
        [("y", F32, y_shape), ("pko", F32, [b, kvn, t, h]), ("pvo", F32, [b, kvn, t, h])],
        is_causal=causal, **attrs,
    )  # fmt: skip
    feeds = {n: rng.standard_normal(shape).astype(np.float32) for n, _, shape in (i for i in inputs if i)}  # fmt: skip
    if mask:
        m = np.where(rng.random((b, 1, s, t)) > 0.2, rng.standard_normal((b, 1, s, t)), -np.inf)
        m[..., 0] = 0.0  # every row keeps one key
        feeds["mask"] = m.astype(np.float32)
    return model, feeds


CASES = {
    "gqa-prompt-packed-rotary": lambda: _gqa(s=13, seqlens=[12], total=13),
    "gqa-right-padded-prompt-static-cache": lambda: _gqa(
        s=9, past=16, seqlens=[4], total=9, seed=1
    ),
    "gqa-decode-with-past": lambda: _gqa(s=1, past=16, seqlens=[10], total=11, seed=2),
    "gqa-batch2-decode": lambda: _gqa(
        b=2, s=1, past=12, present=12, seqlens=[4, 9], total=10, seed=3
    ),
    "gqa-separate-interleaved-window-softcap-scale": lambda: _gqa(
        s=11,
        seqlens=[10],
        total=11,
        packed=False,
        interleaved=1,
        window=3,
        softcap=5.0,
        scale=0.3,
        n=4,
        g=1,
        seed=4,
    ),
    "gqa-chunk-without-rotary": lambda: _gqa(
        s=3, past=16, seqlens=[10], total=11, rotary=False, seed=5
    ),
    # 150 keys: three streaming-softmax blocks, P rounded against the running max of each
    "gqa-three-key-blocks-partial-rotary-smooth": lambda: _gqa(
        s=3, past=160, seqlens=[149], total=150, h=32, half=8, smooth=1, packed=False, seed=6
    ),
    # before opset 13 (no bf16 Cast) the reference rounds with float32 arithmetic
    "gqa-opset12": lambda: _gqa(s=7, seqlens=[6], total=7, opset=12, seed=7),
    "mha-bias-mask-causal-past": _mha,
    # onnxruntime adds mask_filter_value to padded keys: a fully padded row averages V, not 0
    "mha-fully-padded-row": lambda: _mha(padded=11, causal=0),
    "mha-fully-padded-row-causal": lambda: _mha(padded=11),
    "attention23-3d-grouped-mask-causal": lambda: _attention(),
    "attention23-4d-softcap": lambda: _attention(rank=4, mask=False, softcap=3.0),
    "attention23-3d-mask-and-softcap": lambda: _attention(causal=0, softcap=3.0),
    # present = the 4-D key and value inputs themselves
    "attention23-4d-no-past-mask": lambda: _attention(rank=4, past=0, causal=0),
}


def _npu(model, feeds, precision):
    session = Session(model, cache=False, precision=precision)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def _verdicts(model, feeds, precision, outs=None):
    outs = outs if outs is not None else _npu(model, feeds, precision)
    return check_outputs(RoundingReference(model, precision=precision), feeds, outs)


@pytest.mark.parametrize("precision", ["bf16", "mixed"])
@pytest.mark.parametrize("case", list(CASES))
def test_npu_attention_passes_with_a_clear_margin(case, precision):
    model, feeds = CASES[case]()
    for name, v in _verdicts(model, feeds, precision).items():
        assert v.ok, v.describe()
        assert v.rms_ulps < MARGIN, f"{name}: {v.describe()}"
        assert v.worst_ulps < 1.0, f"{name}: {v.describe()}"


def _with_scale(model: onnx.ModelProto, factor: float, head: int) -> onnx.ModelProto:
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    node = wrong.graph.node[0]
    for a in list(node.attribute):
        if a.name == "scale":
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute("scale", factor / float(np.sqrt(head))))
    return wrong


@pytest.mark.parametrize("precision", ["bf16", "mixed"])
def test_attention_scale_one_percent_off_fails(precision):
    model, feeds = _gqa(s=13, seqlens=[12], total=13)
    outs = _npu(_with_scale(model, 1.01, 16), feeds, precision)
    verdicts = _verdicts(model, feeds, precision, outs)
    assert not verdicts["y"].ok, verdicts["y"].describe()
    assert verdicts["pk_out"].ok  # the keys do not depend on the scale


@pytest.mark.parametrize("precision", ["bf16", "mixed"])
def test_corrupted_present_key_row_fails(precision):
    model, feeds = _gqa(s=1, past=16, seqlens=[10], total=11, seed=2)
    outs = _npu(model, feeds, precision)
    outs["pk_out"] = outs["pk_out"].copy()
    outs["pk_out"][:, :, 10] = outs["pk_out"][:, :, 9]  # the new key written one row early
    verdicts = _verdicts(model, feeds, precision, outs)
    assert not verdicts["pk_out"].ok, verdicts["pk_out"].describe()
    assert verdicts["y"].ok


def _ort(model: onnx.ModelProto | ir.Model, feeds):
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("case", list(CASES))
def test_expansion_without_roundings_is_onnxruntimes_attention(case):
    """The kernel's formulation in primitive ops, in float32, against onnxruntime's operator."""
    model, feeds = CASES[case]()
    m = ir.serde.deserialize_model(model)
    nodes = attention_reference.npu_attention_nodes(m.graph)
    assert len(nodes) == 1
    jitters: dict = {}
    attention_reference.expand_attention(m.graph, nodes, jitters, mixed=False, rounds=False)
    assert not jitters and all(n.op_type not in attention_reference.ATTENTION_OPS for n in m.graph)
    got, want = _ort(m, feeds), _ort(model, feeds)
    valid = int(feeds["seqlens_k"][0]) + 1 if case.startswith("gqa-right-padded") else None
    for g, w in zip(got, want):
        if valid is not None and g.ndim == 3:  # onnxruntime's padded prompt rows are its own
            g, w = g[:, :valid], w[:, :valid]
        rms = float(np.sqrt(np.mean(np.square(w))))
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * rms)


QWEN = ("qwen2_tiny_int4", "qwen2_tiny_fp32")


@pytest.mark.parametrize("precision", ["bf16", "mixed"])
@pytest.mark.parametrize("folder", QWEN)
def test_qwen2_tiny_with_past_and_new_tokens(folder, precision):
    path = MODELS_DIR / folder / "model.onnx"
    if not path.is_file():
        pytest.skip(f"{path} not found (the shared real models sit in ../shared/models)")
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 384, (1, 4)).astype(np.int64),
        "attention_mask": np.ones((1, 10), np.int64),
    }
    for layer in (0, 1):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal((1, 2, 6, 32)).astype(
                np.float32
            )
    shapes = {k: v.shape for k, v in feeds.items()}
    session = Session(str(path), cache=False, precision=precision, input_shapes=shapes)
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(None, feeds)))
    reference = RoundingReference(str(path), input_shapes=shapes, precision=precision)
    for name, v in check_outputs(reference, feeds, outs).items():
        assert v.ok, f"{name}: {v.describe()}"
        assert v.rms_ulps < MARGIN, f"{name}: {v.describe()}"
