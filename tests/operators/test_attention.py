"""Attention operators against onnxruntime: com.microsoft GroupQueryAttention / MultiHeadAttention /
RotaryEmbedding, ONNX Attention-23 / RotaryEmbedding-23, Gather on a constant table and the
integer mask arithmetic. Prompts of odd lengths, right padding and grouped heads included."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from opkit import assert_close, run_emu

from npudispatch.operators import attention_math as am

F32, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
NP = {F32: np.float32, I32: np.int32, I64: np.int64}


def _model(op, domain, inputs, outputs, inits=None, opset=23, **attrs):
    """One-node model; ``inputs``/``outputs``: ``(name, elem_type, shape)`` or None (absent)."""
    inits = inits or {}
    node = helper.make_node(
        op, [i[0] if i else "" for i in inputs], [o[0] for o in outputs], domain=domain,
        name=f"{op.lower()}_0", **attrs,
    )  # fmt: skip
    g_in = [
        helper.make_tensor_value_info(n, t, s)
        for n, t, s in (i for i in inputs if i)
        if n not in inits
    ]
    g_out = [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs]
    tensors = [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    graph = helper.make_graph([node], "g", g_in, g_out, initializer=tensors)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rope_caches(max_pos: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (10000 ** (np.arange(half) / half))
    ang = np.arange(max_pos)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _gqa_case(
    *, b=1, s=7, n=6, g=2, h=16, past=0, present=None, seqlens, total, packed=True,
    rotary=True, interleaved=0, window=-1, softcap=0.0, scale=0.0, seed=0,
):  # fmt: skip
    rng = np.random.default_rng(seed)
    present = present or max(past, total)
    cos, sin = _rope_caches(64, h // 2)
    inputs: list = []
    feeds: dict = {}
    if packed:
        inputs += [("qkv", F32, [b, s, (n + 2 * g) * h]), None, None]
        feeds["qkv"] = rng.standard_normal((b, s, (n + 2 * g) * h)).astype(np.float32)
    else:
        inputs += [("q", F32, [b, s, n * h]), ("k", F32, [b, s, g * h]), ("v", F32, [b, s, g * h])]
        for name, w in (("q", n), ("k", g), ("v", g)):
            feeds[name] = rng.standard_normal((b, s, w * h)).astype(np.float32)
    if past:
        inputs += [("pk", F32, [b, g, past, h]), ("pv", F32, [b, g, past, h])]
        feeds["pk"] = rng.standard_normal((b, g, past, h)).astype(np.float32)
        feeds["pv"] = rng.standard_normal((b, g, past, h)).astype(np.float32)
    else:
        inputs += [None, None]
    inputs += [("seqlens_k", I32, [b]), ("total", I32, [])]
    feeds["seqlens_k"] = np.asarray(seqlens, np.int32)
    feeds["total"] = np.asarray(total, np.int32)
    inits = {}
    if rotary:
        inputs += [("cos", F32, list(cos.shape)), ("sin", F32, list(sin.shape))]
        inits = {"cos": cos, "sin": sin}
    outputs = [("y", F32, [b, s, n * h]), ("pk_out", F32, [b, g, present, h]), ("pv_out", F32, [b, g, present, h])]  # fmt: skip
    model = _model(
        "GroupQueryAttention", "com.microsoft", inputs, outputs, inits, num_heads=n,
        kv_num_heads=g, do_rotary=int(rotary), rotary_interleaved=interleaved,
        local_window_size=window, softcap=softcap, scale=scale,
    )  # fmt: skip
    return model, feeds


def _check_gqa(model, feeds, valid_rows=None, scale=2e-2):
    want = _ort(model, feeds)
    got = run_emu(model, feeds)
    rows = slice(None) if valid_rows is None else slice(0, valid_rows)
    assert_close(got["y"][:, rows], want[0][:, rows], scale=scale)
    for name, ref in (("pk_out", want[1]), ("pv_out", want[2])):
        assert_close(got[name], ref, scale=scale)
    # the float32 reference of the operator agrees with onnxruntime tightly
    cfg = got.prepared.cfg
    ins = [None if v is None else (cfg.consts[i] if i in cfg.consts else feeds[v.name])
           for i, v in enumerate(got.prepared.node.inputs)]  # fmt: skip
    ref = cfg.operator.reference(cfg, ins)
    np.testing.assert_allclose(ref[0][:, rows], want[0][:, rows], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("s", [1, 7, 13])
def test_gqa_first_prompt_packed_rotary(s):
    model, feeds = _gqa_case(s=s, seqlens=[s - 1], total=s)
    _check_gqa(model, feeds)


def test_gqa_right_padded_prompt_in_a_static_cache():
    """Odd prompt (5 real tokens of 9) into a 16-row cache: pads never reach real rows."""
    model, feeds = _gqa_case(s=9, past=16, seqlens=[4], total=9, seed=1)
    _check_gqa(model, feeds, valid_rows=5)
    # changing the padded tokens changes nothing a real row sees
    feeds2 = dict(feeds)
    qkv = feeds["qkv"].copy()
    qkv[:, 5:] = 100.0
    feeds2["qkv"] = qkv
    a, b = run_emu(model, feeds), run_emu(model, feeds2)
    np.testing.assert_array_equal(a["y"][:, :5], b["y"][:, :5])


@pytest.mark.parametrize("past_rows", [3, 10])
def test_gqa_decode_one_token_with_static_past(past_rows):
    model, feeds = _gqa_case(s=1, past=16, seqlens=[past_rows], total=past_rows + 1, seed=2)
    _check_gqa(model, feeds)


def test_gqa_batch_of_two_lengths_decode():
    model, feeds = _gqa_case(b=2, s=1, past=12, present=12, seqlens=[4, 9], total=10, seed=3)
    _check_gqa(model, feeds)


def test_gqa_separate_qkv_interleaved_window_softcap_scale():
    model, feeds = _gqa_case(
        s=11, seqlens=[10], total=11, packed=False, interleaved=1, window=3, softcap=5.0,
        scale=0.3, n=4, g=1, seed=4,
    )  # fmt: skip
    _check_gqa(model, feeds)


def test_gqa_subsequent_chunk_without_rotary():
    model, feeds = _gqa_case(s=3, past=16, seqlens=[10], total=11, rotary=False, seed=5)
    _check_gqa(model, feeds)


def test_streaming_softmax_matches_a_plain_softmax():
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 4, 5, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 150, 8)).astype(np.float32) * 4
    v = rng.standard_normal((1, 2, 150, 8)).astype(np.float32)
    allowed = rng.random((1, 1, 5, 150)) > 0.3
    got = am.sdpa(q, k, v, allowed, scale=0.5, bf16=False, block=16)
    kk, vv = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    s = np.where(allowed, q @ np.swapaxes(kk, -1, -2) * 0.5, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(got, (p / p.sum(-1, keepdims=True)) @ vv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [0, 1])
def test_ms_rotary_embedding(interleaved):
    b, s, n, h = 2, 5, 3, 16
    cos, sin = _rope_caches(32, h // 2)
    rng = np.random.default_rng(7)
    model = _model(
        "RotaryEmbedding", "com.microsoft",
        [("x", F32, [b, s, n * h]), ("pos", I64, [b, s]), ("cos", F32, list(cos.shape)), ("sin", F32, list(sin.shape))],
        [("y", F32, [b, s, n * h])], {"cos": cos, "sin": sin}, interleaved=interleaved, num_heads=n,
    )  # fmt: skip
    feeds = {"x": rng.standard_normal((b, s, n * h)).astype(np.float32),
             "pos": rng.integers(0, 32, (b, s)).astype(np.int64)}  # fmt: skip
    assert_close(run_emu(model, feeds)["y"], _ort(model, feeds)[0])


@pytest.mark.parametrize(("rank", "rdim"), [(3, 0), (4, 8)])
def test_onnx_rotary_embedding(rank, rdim):
    b, s, n, h = 1, 7, 2, 16
    half = (rdim or h) // 2
    cos, sin = _rope_caches(32, half)
    shape = [b, s, n * h] if rank == 3 else [b, n, s, h]
    attrs = {"num_heads": n} if rank == 3 else {}
    if rdim:
        attrs["rotary_embedding_dim"] = rdim
    model = _model(
        "RotaryEmbedding", "",
        [("x", F32, shape), ("cos", F32, list(cos.shape)), ("sin", F32, list(sin.shape)), ("pos", I64, [b, s])],
        [("y", F32, shape)], {"cos": cos, "sin": sin}, **attrs,
    )  # fmt: skip
    rng = np.random.default_rng(8)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32),
             "pos": np.arange(3, 3 + s, dtype=np.int64)[None]}  # fmt: skip
    assert_close(run_emu(model, feeds)["y"], _ort(model, feeds)[0])


def test_multi_head_attention_causal_with_past():
    b, s, n, h, past = 1, 5, 4, 8, 6
    d = n * h
    rng = np.random.default_rng(9)
    model = _model(
        "MultiHeadAttention", "com.microsoft",
        [("q", F32, [b, s, d]), ("k", F32, [b, s, d]), ("v", F32, [b, s, d]), None, None, None,
         ("pk", F32, [b, n, past, h]), ("pv", F32, [b, n, past, h])],
        [("y", F32, [b, s, d]), ("pko", F32, [b, n, past + s, h]), ("pvo", F32, [b, n, past + s, h])],
        num_heads=n, unidirectional=1,
    )  # fmt: skip
    feeds = {k: rng.standard_normal(shape).astype(np.float32)
             for k, shape in (("q", (b, s, d)), ("k", (b, s, d)), ("v", (b, s, d)),
                              ("pk", (b, n, past, h)), ("pv", (b, n, past, h)))}  # fmt: skip
    want = _ort(model, feeds)
    got = run_emu(model, feeds)
    for name, ref in zip(("y", "pko", "pvo"), want):
        assert_close(got[name], ref)


@pytest.mark.parametrize("causal", [0, 1])
def test_multi_head_attention_fully_padded_row_follows_onnxruntime(causal):
    """onnxruntime adds mask_filter_value (-10000) to a padded key's score: a row whose keys are
    all padded averages V instead of giving 0 (left-padded batches reach such rows)."""
    b, s, n, h = 2, 4, 2, 8
    d = n * h
    rng = np.random.default_rng(12)
    model = _model(
        "MultiHeadAttention", "com.microsoft",
        [("q", F32, [b, s, d]), ("k", F32, [b, s, d]), ("v", F32, [b, s, d]), None,
         ("mask", I32, [b, s])],
        [("y", F32, [b, s, d])], num_heads=n, unidirectional=causal,
    )  # fmt: skip
    feeds = {k: rng.standard_normal((b, s, d)).astype(np.float32) for k in "qkv"}
    feeds["mask"] = np.asarray([[1, 1, 1, 0], [0, 0, 0, 0]], np.int32)
    (want,) = _ort(model, feeds)
    assert np.abs(want[1]).max() > 0.1  # onnxruntime's padded row is not zeros
    assert_close(run_emu(model, feeds)["y"], want)


@pytest.mark.parametrize("causal", [0, 1])
def test_onnx_attention_grouped_heads_with_past_and_mask(causal):
    b, s, qn, kvn, h, past = 2, 5, 4, 2, 8, 3
    t = past + s
    rng = np.random.default_rng(10)
    mask = np.where(rng.random((b, 1, s, t)) > 0.2, 0.0, -np.inf).astype(np.float32)
    mask[..., 0] = 0.0  # every row keeps one key
    model = _model(
        "Attention", "",
        [("q", F32, [b, s, qn * h]), ("k", F32, [b, s, kvn * h]), ("v", F32, [b, s, kvn * h]),
         ("mask", F32, [b, 1, s, t]), ("pk", F32, [b, kvn, past, h]), ("pv", F32, [b, kvn, past, h])],
        [("y", F32, [b, s, qn * h]), ("pko", F32, [b, kvn, t, h]), ("pvo", F32, [b, kvn, t, h])],
        q_num_heads=qn, kv_num_heads=kvn, is_causal=causal,
    )  # fmt: skip
    feeds = {"q": rng.standard_normal((b, s, qn * h)).astype(np.float32),
             "k": rng.standard_normal((b, s, kvn * h)).astype(np.float32),
             "v": rng.standard_normal((b, s, kvn * h)).astype(np.float32), "mask": mask,
             "pk": rng.standard_normal((b, kvn, past, h)).astype(np.float32),
             "pv": rng.standard_normal((b, kvn, past, h)).astype(np.float32)}  # fmt: skip
    want = _ort(model, feeds)
    got = run_emu(model, feeds)
    for name, ref in zip(("y", "pko", "pvo"), want):
        assert_close(got[name], ref)


def test_gather_constant_table():
    table = np.random.default_rng(11).standard_normal((40, 24)).astype(np.float32)
    model = _model("Gather", "", [("table", F32, [40, 24]), ("ids", I64, [1, 7])],
                   [("y", F32, [1, 7, 24])], {"table": table})  # fmt: skip
    feeds = {"ids": np.asarray([[1, 17, 39, 0, 5, -1, 7]], np.int64)}
    assert_close(run_emu(model, feeds)["y"], _ort(model, feeds)[0], scale=1e-2)


def test_mask_arithmetic_runs_exactly():
    """ReduceSum(mask) - 1 cast to int32: what the genai builder computes for seqlens_k."""
    mask = np.asarray([[1, 1, 1, 1, 1, 0, 0]], np.int64)
    for op, inputs, out, inits, attrs in (
        ("ReduceSum", [("m", I64, [1, 7]), ("ax", I64, [1])], ("y", I64, [1]), {"ax": np.asarray([1])}, {"keepdims": 0}),
        ("Sub", [("m", I64, [1, 7]), ("one", I64, [1])], ("y", I64, [1, 7]), {"one": np.asarray([1])}, {}),
        ("Cast", [("m", I64, [1, 7])], ("y", I32, [1, 7]), {}, {"to": I32}),
    ):  # fmt: skip
        model = _model(op, "", inputs, [out], inits, **attrs)
        got = run_emu(model, {"m": mask})["y"]
        want = _ort(model, {"m": mask})[0]
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_gqa_with_an_empty_past_runs_on_the_npu():
    """A genai decoder's first prompt run feeds past key/value of 0 rows: the canonical-forms
    pass drops them (no past, as the contrib op defines it), so the attention stays on the NPU
    in one kernel call and matches onnxruntime on the model as given."""
    from npudispatch import Session

    b, s, g, h = 1, 5, 2, 16  # _gqa_case defaults: 6 query heads, 2 KV heads of 16
    model, feeds = _gqa_case(s=s, seqlens=[s - 1], total=s)
    graph = model.graph
    node = graph.node[0]
    for slot, name in ((3, "pk"), (4, "pv")):
        node.input[slot] = name
        graph.input.insert(1, helper.make_tensor_value_info(name, TensorProto.FLOAT, [b, g, 0, h]))
        feeds[name] = np.zeros((b, g, 0, h), np.float32)
    want = _ort(model, feeds)
    sess = Session(model, precision="fp32", cache=False)
    got = sess.run(None, feeds)
    assert sess.last_run_stats.kernel_calls == 1 and sess.last_run_stats.cpu_segments == 0
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("seqlens", "total", "why"),
    [([9], 5, "seqlens_k"), ([4], 7, "total_sequence_length 7 must equal the 5 new tokens")],
)
def test_gqa_input_values_onnxruntime_refuses_are_refused_naming_the_node(seqlens, total, why):
    """Values outside what the op accepts (onnxruntime refuses them too) are a ModelError naming
    the node, not a kernel crash blaming the program."""
    from npudispatch import Session
    from npudispatch.errors import ModelError

    model, feeds = _gqa_case(s=5, seqlens=seqlens, total=total, present=8)
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error types vary
        _ort(model, feeds)
    sess = Session(model, cache=False)
    with pytest.raises(ModelError, match=rf"GroupQueryAttention.*refused its inputs.*{why}"):
        sess.run(None, feeds)
