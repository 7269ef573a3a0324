import pytest


@pytest.fixture
def triton_mode(monkeypatch):
    """The public functions take the Triton path (on CPU: through the interpreter, which
    tests/conftest.py turned on before any kernel was imported)."""
    monkeypatch.setenv("RING_RL_KERNELS", "triton")
