"""``npudispatch run MODEL [--inputs x.npz] [--backend emulator] [--check] [--json]``.

Without ``--inputs``, seeded random inputs (``--seed``). ``--check`` compares every output with a
**rounding-aware onnxruntime reference** (:mod:`npudispatch.dispatch.check`: the same rewritten
graph with bf16 rounding where the NPU rounds) and passes when every element is within
:data:`~npudispatch.dispatch.check.ULPS` bf16 ulps of the magnitudes involved; the difference
from plain float32 onnxruntime is reported beside it for information. It exits 1 on a mismatch.
``--rtol`` / ``--atol`` replace that check by ``|actual - expected| <= atol + rtol * |expected|``
against float32 onnxruntime (a policy default fills the one not given, see
:func:`npudispatch.rewrites.precision.tolerance_for_output`).
``--no-pad`` / ``--precision`` (``--fp32``) are the compile options. ``--json`` prints
``{"outputs": {name: {"shape", "dtype", "max_abs", "max_rel", "ok", "tolerance", "check"}},
"kernel_calls", "cpu_segments", "bytes_copied", "stage_seconds", "tolerance", "ok"}``
(comparison fields null without ``--check``; ``tolerance`` maps each output to its rule:
``{"ulps", "reference"}`` by default, ``{"rtol", "atol"}`` with ``--rtol``/``--atol``;
``check`` holds the figures of the rounding-aware comparison and its sentence).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from npudispatch.cli.common import (
    add_dims_option,
    non_negative,
    output_file,
    parse_dims,
    parse_shapes,
    print_json,
    read_input_file,
    writing,
)
from npudispatch.cli.compile_cmd import add_compile_options
from npudispatch.dispatch.backends import backend_names, backend_spec
from npudispatch.dispatch.backends.registry import cli_flag
from npudispatch.errors import ModelError, NoReferenceError, NpuDispatchError

if TYPE_CHECKING:  # onnx-heavy modules load where used: `npudispatch --help` stays fast
    from npudispatch.rewrites.precision import Tolerance

EXIT_MISMATCH = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` command."""
    parser = subparsers.add_parser(
        "run",
        help="run a model (NPU partitions on the emulator or xrt, the rest on the CPU)",
        description="Run a model with npudispatch.Session; optionally check it against onnxruntime.",
    )
    parser.add_argument(
        "model", type=Path, help="ONNX model file, or a program folder from `compile -o`"
    )
    parser.add_argument("--inputs", type=Path, help=".npz file with one array per model input")
    parser.add_argument(
        "--backend", default="emulator", choices=backend_names(), help="emulator (default) or xrt"
    )
    parser.add_argument("--xclbin", type=Path, help="xclbin for the xrt backend")
    parser.add_argument(
        "--fallback",
        default="onnxruntime",
        choices=("onnxruntime", "reference", "none"),
        help="where unsupported nodes run (none: fail on them)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare with a rounding-aware onnxruntime reference (bf16 ulps)",
    )
    parser.add_argument(
        "--rtol",
        type=non_negative(float),
        help="relative tolerance vs float32 onnxruntime (--check; replaces the ulp check)",
    )
    parser.add_argument(
        "--atol",
        type=non_negative(float),
        help="absolute tolerance vs float32 onnxruntime (--check; replaces the ulp check)",
    )
    parser.add_argument(
        "--seed", type=non_negative(int), default=0, help="seed of the random inputs"
    )
    parser.add_argument("-o", "--save-outputs", type=Path, help="write the outputs to this .npz")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    add_dims_option(parser)
    add_compile_options(parser)
    parser.set_defaults(func=run)


def random_inputs(session: Any, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs for every model input: normal floats, small non-negative integers, and
    all-ones integer masks (an input named ``*mask*``, e.g. a decoder's ``attention_mask``: a
    random one would count positions the model does not have)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        free = [d for d in arg.shape if not isinstance(d, int)]
        if free:
            raise ModelError(
                f"input {arg.name!r} has free dims {arg.shape}; random inputs need a shape: "
                f"give --inputs data.npz or the shape with --shape {arg.name}=D0xD1x..."
            )
        dtype = dtype_of(arg.type)
        if np.issubdtype(dtype, np.integer) and "mask" in arg.name.lower():
            feeds[arg.name] = np.ones(arg.shape, dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[arg.name] = rng.integers(0, 32, size=arg.shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[arg.name] = rng.integers(0, 2, size=arg.shape).astype(bool)
        else:
            feeds[arg.name] = rng.standard_normal(arg.shape).astype(np.float32).astype(dtype)
    return feeds


def dtype_of(type_string: str) -> np.dtype:
    """numpy dtype of an onnxruntime type string such as ``tensor(float)``."""
    import onnx_ir as ir

    inner = type_string.removeprefix("tensor(").removesuffix(")")
    name = {"float": "FLOAT", "double": "DOUBLE"}.get(inner, inner.upper())
    return np.dtype(ir.DataType[name].numpy())


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    """Arrays of an .npz file by name (refuses pickled object arrays)."""
    data = read_input_file(path, "--inputs .npz")
    fix = "save the inputs with numpy.savez(FILE, NAME=array, ...), one array per model input"
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise ModelError(f"--inputs {str(path)!r} is not an .npz archive; {fix}")
    try:
        with np.load(io.BytesIO(data)) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelError(f"cannot read --inputs {str(path)!r}: {exc}; {fix}") from exc


def check_input_names(feeds: dict[str, np.ndarray], session: Any, source: Path) -> None:
    """Every model input and nothing else must be in the ``--inputs`` file."""
    expected = [arg.name for arg in session.get_inputs()]
    missing = [n for n in expected if n not in feeds]
    extra = sorted(set(feeds) - set(expected))
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"lacks {missing}")
        if extra:
            problems.append(f"has unknown input(s) {extra}")
        raise ModelError(
            f"--inputs {str(source)!r} {' and '.join(problems)}; the model's inputs are "
            f"{expected}: save exactly one array per input name"
        )


def onnxruntime_outputs(
    model_path: Path, dims: dict[str, int], feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Reference outputs: onnxruntime on the original model (dims bound, npudispatch ops given
    function bodies)."""
    from npudispatch import graph, opset
    from npudispatch.dispatch.ort_session import float_io, onnxruntime_session

    shapes = {name: array.shape for name, array in feeds.items()}
    model = graph.load(model_path, dims=dims, input_shapes=shapes)
    if any(n.domain == opset.DOMAIN for n in model.graph.all_nodes()):
        opset.attach_functions(model)
    model.ir_version = min(model.ir_version, graph.EXTRACT_IR_VERSION)
    names = float_io(model)
    sess = onnxruntime_session(model)
    wide = {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in feeds.items()}
    return dict(zip(names, sess.run(None, wide)))


def check_tolerance(
    session: Any, name: str, expected: np.ndarray, rtol: float | None, atol: float | None
) -> Tolerance:
    """The --check tolerance of output ``name``: the bf16 policy over the NPU ops on its path,
    ``atol`` relative to the reference output's RMS; ``--rtol``/``--atol`` override either."""
    e = np.asarray(expected, np.float64)
    finite = e[np.isfinite(e)]
    rms = float(np.sqrt(np.mean(finite**2))) if finite.size else 0.0
    from npudispatch.rewrites.precision import Tolerance, tolerance_for_output

    tol = tolerance_for_output(session.compiled.model, name).scaled(rms if rms > 0 else 1.0)
    return Tolerance(tol.rtol if rtol is None else rtol, tol.atol if atol is None else atol)


def compare(actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """max_abs / max_rel differences and whether ``actual`` is within ``tol``
    (``|a - e| <= atol + rtol * |e|`` elementwise; NaN/inf must agree)."""
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected).astype(np.float64)
    if a.shape != e.shape:
        return {
            "max_abs": None,
            "max_rel": None,
            "ok": False,
            "error": f"shape {a.shape} != {e.shape}",
        }
    if a.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "ok": True}
    finite = np.isfinite(a) & np.isfinite(e)
    diff = np.where(finite, np.abs(a - e), 0.0)
    rel = diff / np.maximum(np.abs(e), np.finfo(np.float32).tiny)
    return {"max_abs": float(diff.max()), "max_rel": float(rel.max()), "ok": tol.close(a, e)}


_ROUNDING_POINTS = {
    "bf16": "with bf16 rounding where the NPU rounds (op outputs, operands, weights as formatted)",
    "mixed": "with bf16 rounding where mixed compute rounds (multiply-accumulate operands, their "
    "weights as formatted)",
    "fp32": "in float32, as the NPU computes with --fp32 (no rounding points)",
}


def rounding_checks(
    args: argparse.Namespace,
    dims: dict[str, int],
    shapes: dict[str, Any],
    feeds: dict[str, np.ndarray],
    results: dict[str, np.ndarray],
    fp32: dict[str, np.ndarray],
) -> dict[str, Any]:
    """:func:`npudispatch.dispatch.check.check_outputs` of every output (the default --check)."""
    from npudispatch.dispatch.check import RoundingReference, check_outputs

    reference = RoundingReference(
        args.model, dims=dims, input_shapes=shapes or None, precision=args.precision
    )
    return check_outputs(reference, feeds, results, fp32)


@contextlib.contextmanager
def _reference_errors(session: Any) -> Iterator[None]:
    """onnxruntime refusing to run the reference becomes a :class:`NoReferenceError` that says
    the NPU run itself finished."""
    try:
        yield
    except Exception as exc:
        # Only onnxruntime's own errors (Fail, InvalidGraph, NotImplemented...) mean "no
        # reference"; anything else (our loading, a shape mismatch in the verdict) stays itself.
        if isinstance(exc, NpuDispatchError) or not type(exc).__module__.startswith("onnxruntime"):
            raise
        text = str(exc).strip()
        reported = text.splitlines()[0].rstrip(". ") if text else type(exc).__name__
        calls = session.last_run_stats.kernel_calls
        raise NoReferenceError(
            f"--check needs onnxruntime to run the model as its reference, and onnxruntime "
            f"cannot: {reported}. The NPU run itself finished ({calls} kernel call(s)); run "
            "without --check, or save the outputs (--save-outputs) and compare them with "
            "another reference"
        ) from exc


def _refuse_dd_golden(path: Path) -> None:
    """DD's golden graphs are for plan/meta fidelity: say so instead of failing to run them."""
    if not Path(path).is_file():
        return  # a program folder or a missing file: the Session reports those
    import onnx

    from npudispatch.examples.golden import GOLDEN_PURPOSE, is_dd_golden

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file: the Session's loader words that error
        return
    if is_dd_golden(proto):
        raise ModelError(
            f"{str(path)!r} is one of DD's golden graphs. {GOLDEN_PURPOSE}. Inspect it with "
            f"`npudispatch plan {path}` or `npudispatch inspect {path}`; to run a model, try "
            "`npudispatch example llama2-mlp-small -o mlp.onnx`"
        )


def _refuse_non_tensor_io(session: Any, args: argparse.Namespace) -> None:
    """Random inputs and .npz files hold tensors, and --check / --save-outputs compare and save
    tensors: a sequence, map or optional input or output is run from Python instead."""
    inputs = [f"{a.name!r} ({a.type})" for a in session.get_inputs() if a.type[:7] != "tensor("]
    outputs = [f"{a.name!r} ({a.type})" for a in session.get_outputs() if a.type[:7] != "tensor("]
    flags = [f for f, on in (("--check", args.check), ("--save-outputs", args.save_outputs)) if on]
    if inputs or (outputs and flags):
        what = f"input(s) {', '.join(inputs)}" if inputs else f"output(s) {', '.join(outputs)}"
        how = "random inputs and --inputs .npz files" if inputs else " and ".join(flags)
        raise ModelError(
            f"the model's {what} are not tensors, which {how} cannot handle; run it from "
            "Python with npudispatch.Session (feeds and results as onnxruntime takes and "
            "returns them)"
        )


def run(args: argparse.Namespace) -> int:
    """Run the model; with --check compare with onnxruntime."""
    from npudispatch.dispatch.artifact import is_program_dir
    from npudispatch.dispatch.check import ULPS
    from npudispatch.dispatch.session import Session
    from npudispatch.rewrites.precision import Tolerance

    dims = parse_dims(args.dims)
    shapes = parse_shapes(args.shape)
    options: dict[str, Any] = {} if args.xclbin is None else {"xclbin": args.xclbin}
    backend_spec(args.backend).check(options, cli_flag)  # the backend judges its own options
    if args.save_outputs is not None:
        output_file(args.save_outputs, "the outputs")
    _refuse_dd_golden(args.model)
    if args.check and is_program_dir(args.model):
        raise ModelError(
            f"--check compares with onnxruntime on the original model, and {str(args.model)!r} "
            "is a compiled program folder; run `npudispatch run MODEL.onnx --check` instead"
        )
    fallback = None if args.fallback == "none" else args.fallback
    session = Session(
        args.model,
        backend=args.backend,
        fallback=fallback,
        dims=dims,
        input_shapes=shapes or None,
        pad=args.pad,
        precision=args.precision,
        **options,
    )
    _refuse_non_tensor_io(session, args)
    if args.inputs:
        feeds = load_inputs(args.inputs)
        check_input_names(feeds, session, args.inputs)
    else:
        feeds = random_inputs(session, args.seed)
    outputs = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, outputs))
    if args.save_outputs:
        with writing(args.save_outputs, "the outputs"):
            np.savez(args.save_outputs, **{k: np.ascontiguousarray(v) for k, v in results.items()})
    explicit = args.rtol is not None or args.atol is not None
    fed = shapes or {n: tuple(a.shape) for n, a in feeds.items()}  # free dims bound by the feeds
    reference: dict[str, np.ndarray] = {}
    checks: dict[str, Any] = {}
    if args.check:
        with _reference_errors(session):
            reference = onnxruntime_outputs(args.model, dims, feeds)
            checks = rounding_checks(args, dims, fed, feeds, results, reference)
    stats = session.last_run_stats
    summary: dict[str, Any] = {"outputs": {}}
    tolerances: dict[str, Any] = {}
    all_ok = True
    for name, value in results.items():
        if not isinstance(value, np.ndarray):  # a sequence / map / optional (not --check)
            kind = next(o.type for o in session.get_outputs() if o.name == name)
            size = [] if value is None else [len(value)]
            summary["outputs"][name] = {
                "shape": size,
                "dtype": kind,
                "max_abs": None,
                "max_rel": None,
                "ok": None,
            }
            continue
        entry: dict[str, Any] = {"shape": list(value.shape), "dtype": str(value.dtype)}
        if args.check and explicit:
            tol = check_tolerance(session, name, reference[name], args.rtol, args.atol)
            tolerances[name] = tol._asdict()
            entry.update(compare(value, reference[name], tol))
            entry["tolerance"] = tolerances[name]
            all_ok &= entry["ok"]
        elif args.check:
            found = checks[name]
            entry.update(compare(value, reference[name], Tolerance(0.0, 0.0)))
            entry.update(max_abs=found.max_abs, ok=found.ok)
            tolerances[name] = (
                {"ulps": found.allowed_ulps, "reference": "rounding-aware"}
                if found.allowed_ulps is not None  # else quantized: steps of its grid
                else {"steps": found.allowed_steps, "step": found.grid.step,
                      "propagated_steps": found.propagated_steps, "reference": "rounding-aware"}
            )  # fmt: skip
            entry["tolerance"] = tolerances[name]
            entry["check"] = {**found.to_json(), "summary": found.describe()}
            all_ok &= found.ok
        else:
            entry.update({"max_abs": None, "max_rel": None, "ok": None})
        summary["outputs"][name] = entry
    summary.update(
        {
            "kernel_calls": stats.kernel_calls,
            "cpu_segments": stats.cpu_segments,
            "bytes_copied": stats.bytes_copied,
            "stage_seconds": stats.stage_seconds,
            "backend": session.backend.name,
            "tolerance": tolerances if args.check else None,
            "ok": all_ok if args.check else None,
        }
    )
    if args.json:
        print_json(summary)
    else:
        for name, entry in summary["outputs"].items():
            line = f"{name}: {entry['dtype']}{entry['shape']}"
            if args.check and explicit:
                line += (
                    f"  max_abs {entry['max_abs']:.3g}  max_rel {entry['max_rel']:.3g}  "
                    f"{'ok' if entry['ok'] else 'MISMATCH'}"
                )
            elif args.check:
                line += f"  {'ok' if entry['ok'] else 'MISMATCH'}: {entry['check']['summary']}"
            print(line)
        print(
            f"{stats.kernel_calls} kernel call(s), {stats.cpu_segments} CPU segment(s), "
            f"{stats.bytes_copied:,} B copied, {stats.stage_seconds.get('total', 0.0) * 1e3:.1f} ms"
        )
        if args.check and explicit:
            for name, tol in tolerances.items():
                print(
                    f"tolerance {name}: rtol {tol['rtol']:.3g}, atol {tol['atol']:.3g} against "
                    "float32 onnxruntime (given; the policy fills the other)"
                )
        elif args.check:
            print(
                "checked against onnxruntime running the same rewritten graph "
                f"{_ROUNDING_POINTS[args.precision]}: only accumulation order differs, so each element must be within "
                f"{ULPS} bf16 ulps of the magnitudes involved (one ulp carried through the graph "
                "to that element, measured by perturbed reference runs)"
            )
            if any(t.get("steps") for t in tolerances.values()):
                print(
                    "quantized outputs (from QuantizeLinear or a per-tensor DequantizeLinear): "
                    "within one quantization step per element, plus what a one-step difference "
                    "inside the model carries to them (measured by perturbed reference runs)"
                )
    if args.check and not all_ok:
        print("npudispatch run: outputs differ from onnxruntime", file=sys.stderr)
        return EXIT_MISMATCH
    return 0
