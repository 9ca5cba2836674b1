"""Shared fixtures: the tiny model, built once, and runtimes as real subprocesses.

Goal: exercise the runtime exactly as the Rust worker will, over pipes.
Method: one shared runtime (with the tiny model loaded) for tests that leave
it serving, and fresh runtimes for tests that end the process. Nothing is
skipped: without MLX every test fails with the reason.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

from runtime_client import RuntimeClient
from tiny_model import MODEL_ID, SERIAL_MODEL_ID, build_tiny_model


@pytest.fixture(scope="session", autouse=True)
def require_mlx():
    missing = [name for name in ("mlx", "mlx_lm") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed in {sys.executable}: "
            "create the venv from runtime/requirements.txt (see runtime/README.md)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    # Laid out like the worker's model directory: <root>/<org>/<name>.
    out = tmp_path_factory.mktemp("models") / "mlx-worker" / "tiny-llama"
    build_tiny_model(out)
    return out


def start_runtime(env: dict[str, str] | None = None) -> RuntimeClient:
    client = RuntimeClient(sys.executable, env)
    try:
        client.wait_ready()
    except BaseException:
        client.close()
        raise
    return client


@pytest.fixture(scope="session")
def runtime(tiny_model_dir):
    """A runtime serving the tiny model as MODEL_ID (batched, the default batch
    size) and as SERIAL_MODEL_ID (batch size 1), shared by the session.

    Tests using it must leave it serving and let their streams end.
    """
    client = start_runtime()
    probe = client.request("runtime/info", request_id="readiness-probe")
    assert "result" in probe, probe
    client.call("load_model", {"model_id": MODEL_ID, "local_path": str(tiny_model_dir)})
    client.call(
        "load_model",
        {"model_id": SERIAL_MODEL_ID, "local_path": str(tiny_model_dir), "batch_size": 1},
    )
    yield client
    client.call("shutdown")
    assert client.wait_exit() == 0
    assert client.protocol_violations == [], "stdout carried non-JSON lines"
    client.close()


@pytest.fixture
def fresh_runtime():
    """A runtime of the test's own, for tests that end the process or set its
    environment (`start(env={...})`)."""
    clients = []

    def start(env: dict[str, str] | None = None) -> RuntimeClient:
        client = start_runtime(env)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.close()
