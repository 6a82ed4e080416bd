"""Rewrites: the pass manager and the fusion, folding, padding, precision and aliasing passes.

Passes are ``onnx_ir.passes`` passes run in place by :class:`PassManager`; fusions are onnxscript
``RewriteRuleSet``s producing ops of the ``npudispatch`` domain (see :mod:`npudispatch.opset`).
"""

from npudispatch.rewrites.activations import activation_rules
from npudispatch.rewrites.aliasing import ALIAS_KEY, MarkViewsPass, can_be_view, is_view
from npudispatch.rewrites.analysis import GraphAnalysis
from npudispatch.rewrites.folding import BindDimsPass, FoldShapesPass, unbound_dims
from npudispatch.rewrites.manager import PassManager, PassRecord, check_invariants, format_records
from npudispatch.rewrites.matmul import matmul_rules
from npudispatch.rewrites.norms import rms_norm_rules_set, skip_rms_norm_rules_set
from npudispatch.rewrites.pipeline import (
    LATE_PASSES_ANCHOR,
    RulesPass,
    default_pipeline,
    rules_pass,
)

__all__ = [
    "ALIAS_KEY",
    "LATE_PASSES_ANCHOR",
    "BindDimsPass",
    "FoldShapesPass",
    "GraphAnalysis",
    "MarkViewsPass",
    "PassManager",
    "PassRecord",
    "RulesPass",
    "activation_rules",
    "can_be_view",
    "check_invariants",
    "default_pipeline",
    "format_records",
    "is_view",
    "matmul_rules",
    "rms_norm_rules_set",
    "rules_pass",
    "skip_rms_norm_rules_set",
    "unbound_dims",
]
