"""``npudispatch generate MODEL_DIR --prompt-ids 1,17,200 [--max-new-tokens N] [--json]``.

Generates with an onnxruntime-genai model folder: prefill and decode programs resident on the
emulator (or one XRT hardware context with ``--backend xrt --xclbin``), KV cache on the device.
``--prompt "text"`` tokenizes through onnxruntime-genai's tokenizer when that package is
installed (``pip install onnxruntime-genai``); a tokenizer that cannot encode the text for this
model (unknown pieces, ids past the vocabulary) is refused with the reason
(:mod:`npudispatch.generate.tokenizer`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from npudispatch.cli.common import print_json
from npudispatch.cli.compile_cmd import add_precision_options
from npudispatch.dispatch.backends import backend_spec
from npudispatch.dispatch.backends.registry import cli_flag


def _ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids takes comma-separated integers like 1,17,200, got {text!r}"
        ) from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` command."""
    parser = subparsers.add_parser(
        "generate",
        help="generate tokens with an onnxruntime-genai model folder",
        description=(
            "Compile prefill and decode programs once, keep them resident with the KV cache on "
            "the device (emulator), and generate greedily or by top-k/top-p sampling."
        ),
    )
    parser.add_argument("model_dir", type=Path, help="folder with genai_config.json and the model")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", type=_ids, help="prompt token ids, e.g. 1,17,200")
    prompt.add_argument("--prompt", help="prompt text (needs onnxruntime-genai's tokenizer)")
    parser.add_argument("--max-new-tokens", type=_positive, default=None, help="token budget")
    parser.add_argument("--max-length", type=_positive, default=None, help="context rows (KV)")
    parser.add_argument("--prefill-length", type=_positive, default=None, help="prefill tokens")
    parser.add_argument("--sample", action="store_true", help="top-k/top-p sampling (not greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="keep the k most likely (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_precision_options(parser)
    parser.add_argument(
        "--backend", choices=("emulator", "xrt"), default="emulator", help="where programs run"
    )
    parser.add_argument("--xclbin", type=Path, help="xclbin of the xrt backend")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate and print the tokens (and text when a tokenizer is used)."""
    from npudispatch.generate import Generator, SearchOptions
    from npudispatch.generate.tokenizer import PromptTokenizer

    tokenizer = None
    if args.prompt is not None:
        tokenizer = PromptTokenizer.load(args.model_dir)
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = args.prompt_ids
    options = {} if args.xclbin is None else {"xclbin": args.xclbin}
    backend_spec(args.backend).check(options, cli_flag)  # the backend judges its own options
    gen = Generator(
        args.model_dir,
        precision=args.precision,
        max_length=args.max_length,
        prefill_length=args.prefill_length,
        backend=args.backend,
        **options,
    )
    search = SearchOptions(
        do_sample=args.sample,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        seed=args.seed,
    )
    result = gen.generate(prompt, max_new_tokens=args.max_new_tokens, options=search)
    summary = result.to_dict()
    summary["compile_seconds"] = gen.compile_seconds
    summary["precision"] = gen.precision
    summary["const_bytes_shared"] = gen.device.const_bytes
    if tokenizer is not None:
        summary["text"] = tokenizer.decode(result.new_tokens)
    if args.json:
        print_json(summary)
        return 0
    print(" ".join(str(t) for t in result.new_tokens))
    if tokenizer is not None:
        print(summary["text"])
    steps = result.bytes_per_step
    per_step = f"{max(steps):,} B copied per decode step" if steps else "no decode step"
    print(
        f"{len(result.new_tokens)} new tokens ({result.stop_reason}); prefill "
        f"{result.prefill_seconds * 1e3:.0f} ms, {result.tokens_per_second:.1f} tokens/s, "
        f"{per_step}, 1 weight image of {gen.device.const_bytes:,} B shared by both programs, "
        f"{gen.precision} compute",
        file=sys.stderr,
    )
    return 0
