"""The default NPU compilation pipeline and the helper that turns onnxscript rules into a pass."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import RewritePass, pattern

from npudispatch.rewrites.activations import activation_rules
from npudispatch.rewrites.aliasing import MarkViewsPass
from npudispatch.rewrites.canonical import CanonicalFormsPass, constants_last
from npudispatch.rewrites.cnn import conv_activation_rules, conv_fold_rules, hard_activation_rules
from npudispatch.rewrites.folding import (
    BindDimsPass,
    FoldConstantFillsPass,
    FoldConstantViewsPass,
    FoldShapesPass,
)
from npudispatch.rewrites.manager import PassManager
from npudispatch.rewrites.matmul import matmul_rules
from npudispatch.rewrites.norms import rms_norm_rules_set, skip_rms_norm_rules_set
from npudispatch.rewrites.padding import PadTerminalsPass
from npudispatch.rewrites.precision import PrecisionPass
from npudispatch.rewrites.qdq import QdqPass


class RulesPass(RewritePass):
    """An ``onnxscript.rewriter.RewritePass`` with a display name for the pass records.

    With ``canonicalize`` it first moves constants last in Add/Mul (:func:`constants_last`), which
    rule sets written for canonical order (:func:`activation_rules`) rely on.
    """

    def __init__(
        self,
        rules: Sequence[pattern.RewriteRule] | pattern.RewriteRuleSet,
        name: str,
        *,
        canonicalize: bool = False,
    ) -> None:
        super().__init__(rules)
        self.name = name
        self.canonicalize = canonicalize

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        swaps = constants_last(model.graph) if self.canonicalize else 0
        result = super().call(model)
        return ir.passes.PassResult(model, result.modified or swaps > 0)


def rules_pass(
    rules: Sequence[pattern.RewriteRule] | pattern.RewriteRuleSet,
    name: str = "Rules",
    *,
    commute: bool = True,
    canonicalize: bool = False,
) -> RulesPass:
    """Wrap onnxscript rewrite rules (or a rule set) as a pass the PassManager can run.

    A plain sequence is turned into a ``RewriteRuleSet`` with ``commute`` (every operand order);
    ``canonicalize`` moves constants last in Add/Mul before matching (see :class:`RulesPass`).
    """
    if not isinstance(rules, pattern.RewriteRuleSet):
        rules = pattern.RewriteRuleSet(list(rules), commute=commute)
    return RulesPass(rules, name, canonicalize=canonicalize)


@functools.cache
def _built_once(factory: Callable[[], pattern.RewriteRuleSet]) -> pattern.RewriteRuleSet:
    """The default pipeline's rule sets, built once per process: they are fixed, and building one
    (commuting its patterns clones every pattern graph per operand order) cost several ms of every
    compile. Matching keeps no state in a rule set between models."""
    return factory()


# Name of the pass before which the terminal-padding and precision (fp32 -> bf16) passes go:
# `pipeline.add(PadTerminalsPass(), before=LATE_PASSES_ANCHOR)`.
LATE_PASSES_ANCHOR = "MarkViewsPass"


def default_pipeline(
    dims: Mapping[str, int] | None = None,
    *,
    extra_passes: Iterable[ir.passes.PassBase] = (),
    fixpoint: bool = True,
    max_steps: int = 5,
    dump_dir: str | Path | None = None,
    dump_after: Iterable[str] | None = None,
    check: bool = True,
    pad: bool = True,
    bf16: bool = True,
    support: Callable[[ir.Node], str | None] | None = None,
) -> PassManager:
    """The rewrite pipeline for NPU compilation (in place, run with ``pipeline(model)``).

    Order: bind dims (if given) -> fold shape arithmetic -> lift constants -> canonical forms
    (inference-mode Dropout to Identity, Sum to Add) -> constant fills and reshaped constants
    folded -> fusions (activations, HardSigmoid/HardSwish, Conv folding, Conv + activation,
    RMSNorm, skip-RMSNorm, MatMul) -> user
    ``extra_passes`` -> DCE -> terminal padding (``pad``) -> float32 to bf16 compute with casts at
    NPU-partition borders (``bf16``; after padding, whose tied axes the casts would otherwise pin)
    -> mark views. Repeated to a fixpoint by default.

    ``pad=False`` keeps every shape as declared; ``bf16=False`` keeps float32 storage (kernels
    still compute in bf16). ``support`` (``node -> None | reason``) narrows which nodes the
    padding and precision passes treat as NPU nodes; pass the dispatcher's support query when it
    keeps some registry operators on the CPU, so CPU segments see user shapes and float32.
    """
    passes: list[ir.passes.PassBase] = []
    if dims:
        passes.append(BindDimsPass(dims))
    passes += [
        FoldShapesPass(),
        # Scalars and folded shapes become initializers: one const image for the planner.
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        CanonicalFormsPass(),  # inference Dropout -> Identity, Sum -> Add chain
        FoldConstantFillsPass(),  # a weight written as ConstantOfShape is a weight
        FoldConstantViewsPass(),  # and so is a weight reshaped in the graph
        QdqPass(),  # before the float fusions: QDQ groups become quantized NPU ops
        rules_pass(_built_once(activation_rules), "FuseActivations", canonicalize=True),
        # HardSigmoid/HardSwish first: folding would take their "+ 3" into the Conv's bias.
        rules_pass(_built_once(hard_activation_rules), "FuseHardActivations", canonicalize=True),
        rules_pass(_built_once(conv_fold_rules), "FoldConv", canonicalize=True),
        rules_pass(_built_once(conv_activation_rules), "FuseConvActivation", canonicalize=True),
        rules_pass(_built_once(rms_norm_rules_set), "FuseRMSNorm"),
        rules_pass(_built_once(skip_rms_norm_rules_set), "FuseSkipRMSNorm"),
        rules_pass(_built_once(matmul_rules), "FuseMatMul"),
        *extra_passes,
        common_passes.RemoveUnusedNodesPass(),
        *([PadTerminalsPass(support)] if pad else []),
        *([PrecisionPass(support)] if bf16 else []),
        MarkViewsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
    ]
    return PassManager(
        passes,
        fixpoint=fixpoint,
        max_steps=max_steps,
        dump_dir=dump_dir,
        dump_after=dump_after,
        check=check,
    )
