"""npudispatch.progress: a tqdm bar only on a terminal, never with NPUD_PROGRESS=0 or enabled=False."""

from __future__ import annotations

import io

import pytest

from npudispatch.progress import ENV_VAR, progress, progress_enabled


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


# pytest re-installs its own sys.stderr when the test call starts, so the streams are swapped
# in by the test body itself (a fixture's swap would be undone).
def _use(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO) -> io.StringIO:
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.delenv(ENV_VAR, raising=False)
    return stream


def test_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch):
    tty = _use(monkeypatch, _Tty())
    assert list(progress(range(5), desc="work")) == [0, 1, 2, 3, 4]
    out = tty.getvalue()
    assert "work" in out and "5/5" in out


def test_silent_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch):
    pipe = _use(monkeypatch, io.StringIO())
    assert list(progress(iter("abc"), desc="work")) == ["a", "b", "c"]
    assert pipe.getvalue() == ""


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_env_switches_bars_off_even_when_enabled(monkeypatch: pytest.MonkeyPatch, value: str):
    tty = _use(monkeypatch, _Tty())
    monkeypatch.setenv(ENV_VAR, value)
    assert list(progress(range(3), enabled=True)) == [0, 1, 2]
    assert tty.getvalue() == ""
    assert not progress_enabled(True)


def test_explicit_disable_and_force(monkeypatch: pytest.MonkeyPatch):
    pipe = _use(monkeypatch, io.StringIO())
    assert not progress_enabled(False)
    assert progress_enabled(True)  # explicit request on a pipe
    list(progress(range(2), desc="forced", enabled=True))
    assert "forced" in pipe.getvalue()
    monkeypatch.setenv(ENV_VAR, "1")
    assert progress_enabled(None) and not progress_enabled(False)


def test_total_from_len_and_generators(monkeypatch: pytest.MonkeyPatch):
    tty = _use(monkeypatch, _Tty())
    list(progress((i for i in range(4)), total=4, desc="gen"))
    assert "4/4" in tty.getvalue()
