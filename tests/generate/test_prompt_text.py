"""``generate --prompt "text"`` through onnxruntime-genai's tokenizer (optional extra ``genai``).

The shared Qwen2 folders carry a placeholder ``tokenizer.json`` (384 opaque names ``t1``...,
no merges, no ``unk_token``, no byte-level symbols; special tokens at ids 384..386, past the
model's vocabulary): onnxruntime-genai encodes every piece of ordinary text to -1 there, and the
CLI must say so and what to do. A copy of the int4 folder with a byte-level tokenizer written
here shows the working path end to end: the prompt ids are genai's own, and with ``--fp32`` the
greedy continuation equals onnxruntime-genai's generation from the same text.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from corpus_util import MODELS_DIR

from npudispatch.errors import ModelError
from npudispatch.generate.tokenizer import PromptTokenizer, describe_tokenizer_file

og = pytest.importorskip(
    "onnxruntime_genai",
    reason="onnxruntime-genai is not installed: pip install -e '.[dev]' (or '.[genai]')",
)

FOLDER = MODELS_DIR / "qwen2_tiny_int4"
pytestmark = pytest.mark.skipif(
    not FOLDER.is_dir(), reason="needs the Qwen2 genai folders in ../shared/models"
)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "npudispatch.cli", "generate", *args],
        capture_output=True,
        text=True,
    )


def test_placeholder_tokenizer_is_refused_with_the_reason():
    bad = _cli(str(FOLDER), "--prompt", "hello world", "--max-new-tokens", "2")
    assert bad.returncode == 2
    err = bad.stderr
    assert f"{FOLDER / 'tokenizer.json'}" in err and "'hello', 'world'" in err
    assert "id -1" in err and "0 merges" in err and "0 of the 256 byte-level symbols" in err
    assert "'<s>'=384" in err  # special tokens past vocab_size 384
    assert "--prompt-ids" in err and "tokenizer_config.json" in err
    with pytest.raises(ModelError, match=r"ids \[384\] are past the model's vocab_size 384"):
        PromptTokenizer.load(FOLDER).encode("<s>")


def _byte_level_tokenizer() -> dict:
    """A real byte-level BPE tokenizer.json: the 256 byte symbols (ids 0..255) and two merges."""
    from npudispatch.generate.tokenizer import _byte_level_alphabet

    symbols = sorted(_byte_level_alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab["he"], vocab["ll"] = 256, 257
    special = [("<unk>", 380), ("<s>", 381), ("</s>", 382), ("<|endoftext|>", 383)]
    doc = json.loads((FOLDER / "tokenizer.json").read_text())
    doc["added_tokens"] = [
        {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for c, i in special
    ]  # fmt: skip
    doc["model"]["vocab"] = vocab | {c: i for c, i in special}
    doc["model"]["merges"] = ["h e", "l l"]
    return doc


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen2_text")
    for f in FOLDER.iterdir():
        if f.name != "tokenizer.json":
            shutil.copy(f, folder / f.name)
    (folder / "tokenizer.json").write_text(json.dumps(_byte_level_tokenizer()))
    return folder


def test_cli_prompt_text_end_to_end(text_folder):
    text = "hello, hello"
    tokenizer = og.Tokenizer(og.Model(str(text_folder)))
    ids = [int(t) for t in tokenizer.encode(text)]
    assert ids and all(0 <= t < 384 for t in ids) and 256 in ids and 257 in ids  # merges used
    assert describe_tokenizer_file(text_folder / "tokenizer.json", 384).count("256 of the 256")
    out = _cli(
        str(text_folder), "--prompt", text, "--max-new-tokens", "6", "--fp32", "--json",
        "--max-length", "32", "--prefill-length", "16",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["tokens"][: len(ids)] == ids
    assert doc["text"] == tokenizer.decode(np.asarray(doc["new_tokens"], np.int32))
    # onnxruntime-genai generating from the same text: same greedy tokens (float32 compute).
    model = og.Model(str(text_folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 6, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(og.Tokenizer(model).encode(text))
    while not gen.is_done():
        gen.generate_next_token()
    assert doc["tokens"] == [int(t) for t in gen.get_sequence(0)]
