"""The persistent compile cache: second sessions and processes load, bad entries are rebuilt.
Every test points the cache at tmp_path (never the user's cache folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from e2e_models import GOLDEN, assert_close, onnxruntime_run, random_feeds

from npudispatch import Session
from npudispatch.dispatch.cache import CompileCache, default_cache_dir, resolve_cache


def _entries(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/*/compiled.json"))


@pytest.fixture
def g11(tmp_path):
    path = tmp_path / "g11.onnx"
    onnx.save(GOLDEN["G11"](), path)
    return path


def test_second_session_loads_from_disk(g11, tmp_path):
    cache = tmp_path / "cache"
    feeds = random_feeds(GOLDEN["G11"]())
    first = Session(g11, cache=cache)
    assert [e.source for e in first.compile_log] == ["compiled"]
    assert len(_entries(cache)) == 1
    second = Session(g11, cache=cache)
    assert [e.source for e in second.compile_log] == ["disk cache"]
    (a,), (b,) = first.run(None, feeds), second.run(None, feeds)
    np.testing.assert_array_equal(a, b)
    (ref,) = onnxruntime_run(GOLDEN["G11"](), feeds).values()
    assert_close(b, ref)
    assert second.compiled is not None  # re-compiled on demand for the model view


def test_key_covers_shapes_options_and_content(g11, tmp_path):
    cache = tmp_path / "cache"
    Session(g11, cache=cache)
    Session(g11, cache=cache, bf16=False)
    other = tmp_path / "g9.onnx"
    onnx.save(GOLDEN["G9"](), other)
    Session(other, cache=cache)
    assert len(_entries(cache)) == 3
    # Same bytes under another name: same content hash, a hit.
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(g11.read_bytes())
    assert Session(copy, cache=cache).compile_log[0].source == "disk cache"


def test_another_process_loads_instead_of_compiling(g11, tmp_path):
    cache = tmp_path / "cache"
    code = (
        "import sys; from npudispatch import Session; "
        "from npudispatch.dispatch.cache import code_fingerprint; "
        "s = Session(sys.argv[1]); print(s.compile_log[0].source, code_fingerprint())"
    )
    env = {**os.environ, "NPUDISPATCH_CACHE_DIR": str(cache)}

    def start() -> tuple[str, str]:
        out = subprocess.run(
            [sys.executable, "-c", code, str(g11)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        source, _, fingerprint = out.stdout.strip().rpartition(" ")
        return source, fingerprint  # source may be two words ("disk cache")

    first, second = start(), start()
    assert first[0] == "compiled"
    # The key covers npudispatch's own source: if a file changed between the two processes
    # (someone editing the checkout), recompiling is the right answer, not a cache hit.
    assert second[0] == ("disk cache" if first[1] == second[1] else "compiled")


@pytest.mark.parametrize(
    "damage", ["const", "key", "truncate-json", "program-json", "txn", "extra-file", "manifest"]
)
def test_corrupt_or_stale_entries_are_rebuilt_never_run(g11, tmp_path, damage, caplog):
    cache = tmp_path / "cache"
    feeds = random_feeds(GOLDEN["G11"]())
    (good,) = Session(g11, cache=cache).run(None, feeds)
    (entry,) = _entries(cache)
    if damage == "const":
        f = entry / "npu0" / "const.bin"
        data = bytearray(f.read_bytes())
        data[0] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "key":
        key = json.loads((entry / "key.json").read_text())
        key["options"]["pad"] = "something else"
        (entry / "key.json").write_text(json.dumps(key))
    elif damage == "program-json":
        # valid JSON, valid digests of the binaries: only the manifest sees the edit (the
        # deep program check is skipped for manifest-verified entries)
        f = entry / "npu0" / "program.json"
        doc = json.loads(f.read_text())
        doc["outputs"][0]["offset"] += 64
        f.write_text(json.dumps(doc))
    elif damage == "txn":
        f = entry / "npu0" / "txn.bin"
        data = bytearray(f.read_bytes())
        data[-8] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "extra-file":
        (entry / "npu0" / "stray.bin").write_bytes(b"x")
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{}")
    else:
        f = entry / "compiled.json"
        f.write_text(f.read_text()[:20])
    with caplog.at_level("WARNING", logger="npudispatch.dispatch.cache"):
        again = Session(g11, cache=cache)
    assert [e.source for e in again.compile_log] == ["compiled"]
    assert "dropping bad entry" in caplog.text
    np.testing.assert_array_equal(again.run(None, feeds)[0], good)
    assert Session(g11, cache=cache).compile_log[0].source == "disk cache"  # rebuilt


def test_dynamic_shapes_are_cached_per_shape(tmp_path):
    from test_dynamic_shapes import gated_mlp

    model, cache = gated_mlp(), tmp_path / "cache"
    x = np.ones((1, 3, 64), np.float32)
    Session(model, cache=cache).run(None, {"x": x})
    s = Session(model, cache=cache)
    s.run(None, {"x": x})
    assert s.last_run_stats.compile.source == "disk cache"
    s.run(None, {"x": np.ones((2, 3, 64), np.float32)})
    assert s.last_run_stats.compile.source == "compiled"


def test_disabled_cache_writes_nothing(g11, tmp_path, monkeypatch):
    monkeypatch.setenv("NPUDISPATCH_CACHE_DIR", str(tmp_path / "env-cache"))
    Session(g11, cache=False)
    monkeypatch.setenv("NPUDISPATCH_CACHE", "0")
    assert resolve_cache(None) is None
    Session(g11)
    assert not (tmp_path / "env-cache").exists()
    monkeypatch.setenv("NPUDISPATCH_CACHE", "1")
    Session(g11)
    assert len(_entries(tmp_path / "env-cache")) == 1


def test_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("NPUDISPATCH_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "npudispatch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "npudispatch"
    assert resolve_cache(tmp_path / "x").directory == tmp_path / "x"
    assert isinstance(resolve_cache(True), CompileCache)


def test_size_bound_removes_least_recently_used_entries(g11, tmp_path):
    cache = CompileCache(tmp_path / "cache", max_bytes=10**9)
    Session(g11, cache=cache)
    other = tmp_path / "g9.onnx"
    onnx.save(GOLDEN["G9"](), other)
    Session(other, cache=cache)
    older, newer = sorted(
        _entries(cache.directory), key=lambda e: (e / "key.json").stat().st_mtime_ns
    )
    os.utime(older / "key.json", (1, 1))  # g11's entry: used long ago
    Session(g11, cache=cache, bf16=False)  # fits: nothing removed
    assert len(_entries(cache.directory)) == 3
    cache.max_bytes = 1  # every entry is too big now: all but the newest go, oldest first
    Session(g11, cache=cache, pad=False)
    assert len(_entries(cache.directory)) == 1 and not older.exists() and not newer.exists()
