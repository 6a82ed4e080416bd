"""Graph layer: load ONNX models into onnx_ir, networkx views, topological order, tensor lifetimes, partitions.

Typical use::

    from npudispatch import graph
    model = graph.load("model.onnx", dims={"batch": 1})
    order = graph.topological_order(model)
    live = graph.lifetimes(model, order)
    rep = graph.report(model, graph.default_support)
    sub = graph.extract(model, rep.npu_partitions[0])
"""

from npudispatch.graph.lifetimes import Lifetime, lifetimes, live_ranges
from npudispatch.graph.load import ModelLike, load
from npudispatch.graph.naming import assign_unique_names
from npudispatch.graph.order import node_inputs, to_networkx, topological_order
from npudispatch.graph.partition import (
    EXTRACT_IR_VERSION,
    Partition,
    PartitionReport,
    UnsupportedNode,
    extract,
    partition,
    partition_names,
    report,
)
from npudispatch.graph.support import (
    DEFAULT_NPU_DTYPES,
    DEFAULT_NPU_OP_TYPES,
    STANDARD_DOMAINS,
    Supported,
    SupportQuery,
    as_support_query,
    default_support,
)

__all__ = [
    "DEFAULT_NPU_DTYPES",
    "DEFAULT_NPU_OP_TYPES",
    "EXTRACT_IR_VERSION",
    "STANDARD_DOMAINS",
    "Lifetime",
    "ModelLike",
    "Partition",
    "PartitionReport",
    "SupportQuery",
    "Supported",
    "UnsupportedNode",
    "as_support_query",
    "assign_unique_names",
    "default_support",
    "extract",
    "lifetimes",
    "live_ranges",
    "load",
    "node_inputs",
    "partition",
    "partition_names",
    "report",
    "to_networkx",
    "topological_order",
]
