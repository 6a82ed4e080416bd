"""Operator library: per-op matching, buffer requirements, transactions, params, weight formatting,
kernels and numpy references (docs/architecture.md §2, §8.1; docs/overlay_abi.md).

Public entry points: :func:`registry.match` (node -> :class:`~.base.OpConfig` or
:class:`~.base.Decline`), :func:`registry.support` (for ``graph.partition``),
:func:`registry.kernels` (kernel id -> callable, for the emulator), and
:func:`npudispatch.testing.harness.run_single` (run one operator alone on the emulator).

Adding an operator
------------------
1. Write one module ``npudispatch/operators/<family>.py`` with a subclass of
   :class:`~npudispatch.operators.base.Operator` setting ``op_type``, ``domain`` (default ``""``)
   and a unique ``kernel_id`` (framework ops 1..99, matmul family 100..199, new families: the next
   free hundred), and implementing:

   * ``match(node)`` -> ``OpConfig`` or ``Decline("precise reason")``;
     ``elementwise.match_float_node`` does arity/shape/dtype/constant-input checks for float ops;
   * ``compute(inputs, outputs, dims, floats)`` -> the kernel's outputs from typed, shaped inputs
     (use ``dtypes.to_compute``/``dtypes.store`` for the bf16 compute rule);
   * ``reference(cfg, inputs)`` -> ONNX semantics in numpy;
   * optionally ``op_dims``/``op_floats`` (op parameters the kernel reads from the record),
     ``granularity`` (padding constraints), ``operand_streams`` (n-d DMA patterns), or
     ``buffers``/``format_consts``/``transaction``/``kernel`` for ops with their own layouts.

   The base class derives buffers (one local argidx per tensor, DD ``OpArgMap`` style), the
   params record, the const region and the overlay launch transaction (``dma.launch``, striped
   over the columns) from those.
2. Add one line ``register(MyOp)`` below. Registration order is candidate priority for a
   ``(domain, op_type)``; kernel ids must be unique (checked at import).
3. Add tests under ``tests/operators/`` comparing ``npudispatch.testing.harness.run_single`` with ``reference`` and
   with onnxruntime on a one-node model.
"""

from npudispatch.operators.activations import Gelu, NpuGelu, Sigmoid, Silu
from npudispatch.operators.attention import Attention, GroupQueryAttention, MultiHeadAttention
from npudispatch.operators.batchnorm import BatchNormalization
from npudispatch.operators.cast import Cast
from npudispatch.operators.cnn_activations import (
    Clip,
    Elu,
    HardSigmoid,
    HardSwish,
    LeakyRelu,
    PRelu,
    Selu,
)
from npudispatch.operators.conv import Conv, ConvTranspose, FusedConv, FusedConvTranspose
from npudispatch.operators.datamove import Concat, Slice, Split
from npudispatch.operators.elementwise import Add, Div, Max, Min, Mul, Sub, Where
from npudispatch.operators.lookup import GatherTable, IntAdd, IntCast, IntReduceSum, IntSub
from npudispatch.operators.lrn import LRN
from npudispatch.operators.matmul import Gemm, MatMul, MatMulBias
from npudispatch.operators.matmul_nbits import MatMulNBits
from npudispatch.operators.norms import (
    LayerNormalization,
    SimplifiedLayerNormalization,
    SkipSimplifiedLayerNormalization,
)
from npudispatch.operators.pool import AveragePool, GlobalAveragePool, GlobalMaxPool, MaxPool
from npudispatch.operators.qdq_fused import QDQ_OPERATORS
from npudispatch.operators.qmatmul import QLinearMatMul, QMatMul
from npudispatch.operators.quantize import DequantizeLinear, QuantizeLinear
from npudispatch.operators.reduce import ReduceMax, ReduceMean, ReduceMin, ReduceSum
from npudispatch.operators.registry import register
from npudispatch.operators.resize import Resize, Upsample
from npudispatch.operators.rotary import MsRotaryEmbedding, OnnxRotaryEmbedding
from npudispatch.operators.softmax import Softmax
from npudispatch.operators.spatial import DepthToSpace, Pad, SpaceToDepth
from npudispatch.operators.transpose import Transpose
from npudispatch.operators.unary import (
    Abs,
    Cos,
    Erf,
    Exp,
    Log,
    Neg,
    Pow,
    Reciprocal,
    Relu,
    Sin,
    Softplus,
    Sqrt,
    Tanh,
)

register(Add)
register(Sub)
register(Mul)
register(Div)
register(Max)
register(Min)
register(Where)
register(Sigmoid)
register(Silu)
register(NpuGelu)
register(Gelu)
register(Relu)
register(Neg)
register(Abs)
register(Exp)
register(Log)
register(Tanh)
register(Erf)
register(Sqrt)
register(Reciprocal)
register(Sin)
register(Cos)
register(Softplus)
register(Pow)
register(Clip)
register(HardSigmoid)
register(HardSwish)
register(LeakyRelu)
register(PRelu)
register(Elu)
register(Selu)
register(BatchNormalization)
register(LRN)
register(Softmax)
register(ReduceMean)
register(ReduceSum)
register(ReduceMax)
register(ReduceMin)
register(LayerNormalization)
register(SimplifiedLayerNormalization)
register(SkipSimplifiedLayerNormalization)
register(Transpose)
register(Cast)
register(Split)
register(Concat)
register(Slice)
register(Pad)
register(DepthToSpace)
register(SpaceToDepth)
register(Resize)
register(Upsample)
register(MatMul)
register(Gemm)
register(MatMulBias)
register(MatMulNBits)
register(QMatMul)
register(QLinearMatMul)
register(QuantizeLinear)
register(DequantizeLinear)
for _qdq_op in QDQ_OPERATORS:
    register(_qdq_op)
register(GroupQueryAttention)
register(MultiHeadAttention)
register(Attention)
register(MsRotaryEmbedding)
register(OnnxRotaryEmbedding)
register(GatherTable)
register(IntReduceSum)
register(IntAdd)
register(IntSub)
register(IntCast)
register(Conv)
register(FusedConv)
register(ConvTranspose)
register(FusedConvTranspose)
register(MaxPool)
register(AveragePool)
register(GlobalAveragePool)
register(GlobalMaxPool)
