"""Persistent compile cache: compiled models saved on disk, found again by another process.

An entry is a :class:`~npudispatch.dispatch.artifact.CompiledArtifact` folder named by the sha256
of its key: the model's content hash (the ``.onnx`` bytes and every external-data file it
references), the bound input shapes, the compile options and the npudispatch version together
with a fingerprint of its own source files (so a changed operator never reuses an old program).
``key.json`` in the entry repeats the key and ``manifest.json`` holds the sha256 of every other
file in the entry; an entry whose key, format, file list or any file hash does not match is
*stale or corrupt*: it is removed and rebuilt, never run.

Location: ``$NPUDISPATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/npudispatch``, else
``~/.cache/npudispatch``. ``NPUDISPATCH_CACHE=0`` (or ``off``/``false``/``no``) disables it;
``Session(..., cache=False | DIR | CompileCache)`` overrides both. Entries are written to a
temporary folder and renamed into place, so a reader never sees half an entry. The folder is
kept under ``NPUDISPATCH_CACHE_MAX_MB`` (default 4 GiB): least recently used entries go first.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from npudispatch.dispatch.artifact import CompiledArtifact
from npudispatch.dispatch.dynamic import ModelSource
from npudispatch.dispatch.emit import FILES as PROGRAM_FILES
from npudispatch.errors import NpuDispatchError

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_ENV",
    "CACHE_MAX_ENV",
    "CompileCache",
    "code_fingerprint",
    "default_cache_dir",
    "model_digest",
    "resolve_cache",
]

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "NPUDISPATCH_CACHE_DIR"
CACHE_ENV = "NPUDISPATCH_CACHE"
CACHE_MAX_ENV = "NPUDISPATCH_CACHE_MAX_MB"
#: Default size bound of the cache folder; least recently used entries go first.
DEFAULT_MAX_BYTES = 4 * 2**30
_KEY_FILE = "key.json"
_MANIFEST_FILE = "manifest.json"
_OFF = {"0", "off", "false", "no"}


def default_cache_dir() -> Path:
    """``$NPUDISPATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/npudispatch``, else ``~/.cache/...``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "npudispatch"


@functools.cache
def code_fingerprint() -> str:
    """sha256 over npudispatch's own ``.py`` files: programs depend on operator code."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _hash_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())


def model_digest(source: ModelSource) -> str:
    """Content hash of a model: the file's bytes (or the serialized proto) and every
    external-data file it references."""
    h = hashlib.sha256()
    if source.file is not None:
        _hash_file(h, source.file)
    else:
        h.update(hashlib.sha256(source.proto.SerializeToString(deterministic=True)).digest())
    for target in source.external_files():
        h.update(target.name.encode())
        if target.is_file():  # a missing file is reported by the loader, with its reason
            _hash_file(h, target)
    return h.hexdigest()


def _digests(
    entry: Path, keep: Collection[str] = (), into: dict[str, bytes] | None = None
) -> dict[str, str]:
    """sha256 of every file under ``entry`` (but the manifest), by POSIX relative path; the
    bytes of files named in ``keep`` are read whole, hashed and stored in ``into``."""
    out = {}
    for f in sorted(entry.rglob("*")):
        if not f.is_file() or f.name == _MANIFEST_FILE:
            continue
        rel = f.relative_to(entry).as_posix()
        if into is not None and f.name in keep:
            data = f.read_bytes()
            into[rel] = data
            out[rel] = hashlib.sha256(data).hexdigest()
        else:
            with open(f, "rb") as fh:
                out[rel] = hashlib.file_digest(fh, "sha256").hexdigest()
    return out


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class CompileCache:
    """Compiled models on disk under ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | Path | None = None, max_bytes: int | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        if max_bytes is None:
            mb = os.environ.get(CACHE_MAX_ENV, "").strip()
            try:
                max_bytes = int(float(mb) * 2**20) if mb else DEFAULT_MAX_BYTES
            except ValueError:
                raise NpuDispatchError(
                    f"{CACHE_MAX_ENV}={mb!r} is not a number of megabytes (e.g. 2048)"
                ) from None
        self.max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"CompileCache({str(self.directory)!r})"

    @staticmethod
    def key_material(
        digest: str, shapes: Mapping[str, Sequence[int]], options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Everything the compiled program depends on, as one JSON-able document."""
        from npudispatch import __version__

        return {
            "model_sha256": digest,
            "input_shapes": {k: [int(d) for d in v] for k, v in sorted(shapes.items())},
            "options": {k: options[k] for k in sorted(options)},
            "npudispatch": __version__,
            "code": code_fingerprint(),
        }

    @staticmethod
    def key(material: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def entry(self, key: str) -> Path:
        return self.directory / key[:2] / key

    def digest(self, source: ModelSource) -> str:
        """:func:`model_digest` of ``source``; for a file it is remembered with the size,
        mtime and inode of the file and its external data, and re-hashed when any changed."""
        if source.file is None:
            return model_digest(source)
        path = source.file.resolve()
        memo = self.directory / "models" / f"{hashlib.sha256(str(path).encode()).hexdigest()}.json"
        try:
            doc = json.loads(memo.read_text())
            if all(_stat(Path(f)) == st for f, st in doc["stats"].items()):
                return str(doc["digest"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        digest = model_digest(source)
        files = [path, *(f.resolve() for f in source.external_files() if f.is_file())]
        self._write_json(memo, {"stats": {str(f): _stat(f) for f in files}, "digest": digest})
        return digest

    def summary(self, source: ModelSource, digest: str) -> dict[str, Any]:
        """:meth:`ModelSource.summary` (signature, dim names, metadata), kept per model digest
        so a warm start does not parse the model."""
        memo = self.directory / "models" / f"{digest}.summary.json"
        try:
            return dict(json.loads(memo.read_text()))
        except (OSError, ValueError):
            pass
        summary = source.summary()
        self._write_json(memo, summary)
        return summary

    @staticmethod
    def _write_json(path: Path, doc: Any) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("compile cache: cannot write %s (%s)", path, exc)

    def load(self, material: Mapping[str, Any]) -> CompiledArtifact | None:
        """The cached artifact for ``material``, or None (a bad entry is removed, never run)."""
        entry = self.entry(self.key(material))
        if not entry.is_dir():
            return None
        try:
            stored = json.loads((entry / _KEY_FILE).read_text())
            if stored != json.loads(json.dumps(material, sort_keys=True)):
                raise NpuDispatchError(f"{entry / _KEY_FILE} holds another key (stale entry)")
            # Trust: the manifest's digests cover every byte of every file the loader reads
            # (compiled.json, each program's program.json / txn.bin / const.bin / params.bin,
            # CPU segment models, constants, key.json), and they were written in the same
            # store() as those files by the code the key's fingerprint names, i.e. this code.
            # So the files are exactly the ones this code saved from a program it compiled;
            # re-validating them (program_check's transaction walk, each record decode) could
            # only find what the compiler itself produced. Any damaged, missing or extra file
            # fails the manifest and the entry is rebuilt. Entries without a manifest get the
            # full checks.
            verified = self._verify_manifest(entry)
            artifact = CompiledArtifact.load(entry, trusted=verified is not None, contents=verified)
            os.utime(entry / _KEY_FILE)  # last use, for the least-recently-used trim
            return artifact
        except (OSError, ValueError, NpuDispatchError) as exc:
            log.warning("compile cache: dropping bad entry %s (%s); re-compiling", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    @staticmethod
    def _verify_manifest(entry: Path) -> dict[str, bytes] | None:
        """Check that ``manifest.json`` lists exactly the entry's files, each with its sha256
        (raises :class:`NpuDispatchError` when not); None for an entry written without one.
        Returns the verified bytes of the programs' files, hashed and kept in one read."""
        path = entry / _MANIFEST_FILE
        if not path.is_file():
            return None
        doc = json.loads(path.read_text())
        listed = doc.get("sha256") if isinstance(doc, dict) else None
        if not isinstance(listed, dict):
            raise NpuDispatchError(f"{path} is malformed")
        kept: dict[str, bytes] = {}
        found = _digests(entry, keep=PROGRAM_FILES, into=kept)
        if found != listed:
            changed = sorted(set(found) ^ set(listed)) or sorted(
                f for f in found if found[f] != listed.get(f)
            )
            raise NpuDispatchError(f"{path}: {', '.join(changed)} differ from the manifest")
        return kept

    def store(self, material: Mapping[str, Any], artifact: CompiledArtifact) -> Path | None:
        """Save ``artifact`` under its key; a write failure is logged, not raised (the run
        goes on with the program in memory)."""
        entry = self.entry(self.key(material))
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name[:16]}-", dir=entry.parent))
            try:
                artifact.save(tmp)
                (tmp / _KEY_FILE).write_text(json.dumps(material, sort_keys=True))
                manifest = {"sha256": _digests(tmp)}
                (tmp / _MANIFEST_FILE).write_text(json.dumps(manifest, sort_keys=True))
                if entry.exists():  # another process won the race, or a bad entry is in place
                    shutil.rmtree(entry, ignore_errors=True)
                os.replace(tmp, entry)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            self.trim(keep=entry)
            return entry
        except OSError as exc:
            log.warning("compile cache: cannot write %s (%s); continuing without it", entry, exc)
            return None

    def trim(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries until the cache holds at most ``max_bytes``
        (``keep``, the entry just written, stays); returns the removed entries."""
        entries = []
        for key_file in self.directory.glob(f"??/*/{_KEY_FILE}"):
            entry = key_file.parent
            try:
                size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                entries.append((key_file.stat().st_mtime_ns, size, entry))
            except OSError:
                continue  # removed by another process meanwhile
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry == keep:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            total -= size
            removed.append(entry)
        if removed:
            log.info("compile cache: removed %d least recently used entries", len(removed))
        return removed

    def clear(self) -> None:
        """Remove every entry."""
        shutil.rmtree(self.directory, ignore_errors=True)


def resolve_cache(
    cache: CompileCache | str | os.PathLike[str] | bool | None,
) -> CompileCache | None:
    """``Session``'s ``cache=`` argument: None (default: on unless ``NPUDISPATCH_CACHE=0``),
    False (off), True (default folder), a folder, or a :class:`CompileCache`."""
    if isinstance(cache, CompileCache):
        return cache
    if cache is False:
        return None
    if cache is None and os.environ.get(CACHE_ENV, "").strip().lower() in _OFF:
        return None
    if cache is None or cache is True:
        return CompileCache()
    return CompileCache(cache)
