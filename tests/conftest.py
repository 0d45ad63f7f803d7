"""Test-wide settings: no test may reach the network.

The environment is set before anything imports huggingface_hub, which reads it at import.
Tests that talk to a Hub use the ``fake_hub`` fixture (a loopback server, tests/fake_hub.py).
"""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mergekit_like_hf_home_")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_TOKEN_PATH", "HF_HUB_CACHE"):
    os.environ.pop(_name, None)

import pytest  # noqa: E402


@pytest.fixture
def fake_hub(monkeypatch):
    """A started FakeHub with online mode switched on for this test only; stopped afterwards.

    Patches env HF_HUB_OFFLINE=0 (read by the project) and ``huggingface_hub.constants``
    HF_HUB_OFFLINE=False / HF_HUB_DISABLE_XET=True (read by the library at call time).
    """
    import huggingface_hub.constants as hf_constants
    from huggingface_hub.utils import close_session

    from support.fake_hub import FakeHub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    hub = FakeHub().start()
    try:
        yield hub
    finally:
        hub.stop()
        close_session()  # drop pooled keep-alive connections to this server


@pytest.fixture(autouse=True)
def _fake_hub_guard(request):
    """After a test that used ``fake_hub``: every request came to 127.0.0.1, and the fake
    itself raised no internal error."""
    yield
    hub = request.node.funcargs.get("fake_hub") if hasattr(request.node, "funcargs") else None
    if hub is None:
        return
    hosts = {r.host for r in hub.log if r.host.rsplit(":", 1)[0] != "127.0.0.1"}
    if hosts:
        pytest.fail(f"requests with a non-loopback Host header: {sorted(hosts)}")
    if hub.server_errors:
        pytest.fail("fake hub internal error:\n" + hub.server_errors[0])
