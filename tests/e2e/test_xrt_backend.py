"""The xrt backend on the fake pyxrt (emulator executor) gives the emulator backend's outputs."""

from __future__ import annotations

import numpy as np
import pytest
from e2e_models import GOLDEN, random_feeds

from npudispatch import Session, compile_model
from npudispatch.dispatch.backends import get_backend
from npudispatch.operators import registry
from npudispatch.testing import emulator_executor, install_fake_pyxrt, write_fake_xclbin


@pytest.mark.filterwarnings("ignore:Legacy TXN flow:DeprecationWarning")
@pytest.mark.parametrize("name", ["G11", "G14", "G15"])
@pytest.mark.parametrize("convention", ["mlir-aie", "dynamic-dispatch"])
def test_fake_pyxrt_matches_emulator(tmp_path, name, convention):
    model = GOLDEN[name]()
    feeds = random_feeds(model, seed=3)
    expected = Session(model).run(None, feeds)
    xclbin = write_fake_xclbin(tmp_path / "fake.xclbin")
    with install_fake_pyxrt(emulator_executor(registry.kernels())) as pyxrt:
        session = Session(model, backend="xrt", xclbin=xclbin, convention=convention)
        got = session.run(None, feeds)
        assert pyxrt.FAKE_SYSTEM is not None
    assert session.backend.name == "xrt"
    assert session.last_run_stats.kernel_calls == len(session.programs)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_sessions_share_one_backend(tmp_path):
    """Two sessions on one backend object (one device context) both run correctly."""
    m1, m2 = GOLDEN["G9"](), GOLDEN["G15"]()
    f1, f2 = random_feeds(m1), random_feeds(m2)
    want1, want2 = Session(m1).run(None, f1), Session(m2).run(None, f2)
    xclbin = write_fake_xclbin(tmp_path / "fake.xclbin")
    with install_fake_pyxrt(emulator_executor(registry.kernels()), context_limit=1):
        backend = get_backend("xrt", xclbin=xclbin)
        s1, s2 = Session(m1, backend=backend), Session(m2, backend=backend)
        for _ in range(2):
            for got, want in ((s1.run(None, f1), want1), (s2.run(None, f2), want2)):
                for a, b in zip(got, want):
                    np.testing.assert_array_equal(a, b)
    compiled = compile_model(m1)
    with pytest.raises(ValueError, match="backend_options"):
        Session(compiled, backend=get_backend("emulator"), num_cols=4)
