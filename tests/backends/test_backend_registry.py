"""Backends by name: each backend's spec checks its own options and names them as the caller does."""

from __future__ import annotations

import pytest

from npudispatch.dispatch.backends import BackendSpec, backend_names, backend_spec, get_backend
from npudispatch.dispatch.backends.emulator import EmulatorBackend
from npudispatch.dispatch.backends.registry import cli_flag, register_backend
from npudispatch.errors import BackendUnavailableError


def test_builtin_backends_are_listed_and_created_by_name():
    assert backend_names()[:2] == ("emulator", "xrt")
    assert isinstance(get_backend("emulator"), EmulatorBackend)
    with pytest.raises(BackendUnavailableError, match=r"unknown backend 'tpu'.*emulator, xrt"):
        get_backend("tpu")


def test_options_are_checked_by_the_backend_and_named_like_the_caller(tmp_path):
    xrt = backend_spec("xrt")
    with pytest.raises(BackendUnavailableError, match="needs xclbin="):
        xrt.check({})
    with pytest.raises(BackendUnavailableError, match="needs --xclbin"):
        xrt.check({}, cli_flag)
    with pytest.raises(BackendUnavailableError, match=r"--xclbin '.*missing.xclbin' is not a file"):
        xrt.check({"xclbin": tmp_path / "missing.xclbin"}, cli_flag)
    (tmp_path / "a.xclbin").write_bytes(b"x")
    with pytest.raises(BackendUnavailableError, match="convention= 'x86'"):
        xrt.check({"xclbin": tmp_path / "a.xclbin", "convention": "x86"})
    xrt.check({"xclbin": tmp_path / "a.xclbin", "convention": "dynamic-dispatch"})
    emulator = backend_spec("emulator")
    with pytest.raises(BackendUnavailableError, match="--xclbin is for --backend xrt"):
        emulator.check({"xclbin": tmp_path / "a.xclbin"}, cli_flag)
    with pytest.raises(BackendUnavailableError, match="xclbin= is for backend='xrt'"):
        get_backend("emulator", xclbin=tmp_path / "a.xclbin")
    with pytest.raises(BackendUnavailableError, match="num_cols= 9"):
        get_backend("emulator", num_cols=9)


def test_a_registered_backend_is_found_by_name():
    made = []

    def create(**options):
        made.append(options)
        return EmulatorBackend()

    spec = register_backend(
        BackendSpec("test-only", "an emulator under another name", create, options=("level",))
    )
    try:
        assert "test-only" in backend_names()
        assert isinstance(get_backend("test-only", level=2), EmulatorBackend)
        assert made == [{"level": 2}]
        with pytest.raises(ValueError, match="already registered"):
            register_backend(BackendSpec("test-only", "", create))
    finally:
        from npudispatch.dispatch.backends import registry

        registry._SPECS.pop(spec.name)
