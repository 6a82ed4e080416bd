"""Rewrites: the pass manager and the fusion, folding, padding, precision and aliasing passes.

Passes are ``onnx_ir.passes`` passes run in place by :class:`PassManager`; fusions are onnxscript
``RewriteRuleSet``s producing ops of the ``npudispatch`` domain (see :mod:`npudispatch.opset`).
"""

from npudispatch.rewrites.activations import activation_rules
from npudispatch.rewrites.aliasing import ALIAS_KEY, MarkViewsPass, can_be_view, is_view
from npudispatch.rewrites.analysis import GraphAnalysis
from npudispatch.rewrites.cnn import conv_activation_rules, conv_fold_rules, hard_activation_rules
from npudispatch.rewrites.folding import BindDimsPass, FoldShapesPass, unbound_dims
from npudispatch.rewrites.manager import PassManager, PassRecord, check_invariants, format_records
from npudispatch.rewrites.matmul import matmul_rules
from npudispatch.rewrites.norms import rms_norm_rules_set, skip_rms_norm_rules_set
from npudispatch.rewrites.padding import (
    PaddingReport,
    PadTerminalsPass,
    pad_model,
)
from npudispatch.rewrites.pipeline import (
    LATE_PASSES_ANCHOR,
    RulesPass,
    default_pipeline,
    rules_pass,
)
from npudispatch.rewrites.precision import (
    PrecisionPass,
    PrecisionReport,
    convert_to_bf16,
    tolerance_for,
)

__all__ = [
    "ALIAS_KEY",
    "LATE_PASSES_ANCHOR",
    "BindDimsPass",
    "FoldShapesPass",
    "GraphAnalysis",
    "MarkViewsPass",
    "PadTerminalsPass",
    "PaddingReport",
    "PassManager",
    "PassRecord",
    "PrecisionPass",
    "PrecisionReport",
    "RulesPass",
    "activation_rules",
    "can_be_view",
    "check_invariants",
    "conv_activation_rules",
    "conv_fold_rules",
    "convert_to_bf16",
    "default_pipeline",
    "format_records",
    "hard_activation_rules",
    "is_view",
    "matmul_rules",
    "pad_model",
    "rms_norm_rules_set",
    "rules_pass",
    "skip_rms_norm_rules_set",
    "tolerance_for",
    "unbound_dims",
]
