import os

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton: its kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def private_user_dirs(tmp_path_factory):
    """The user cache (exported artifacts) and runtime folder (sockets) of the servers that tests
    start live in a temporary folder, not the home directory."""
    base = tmp_path_factory.mktemp("user")
    old = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "XDG_RUNTIME_DIR")}
    os.environ["XDG_CACHE_HOME"], os.environ["XDG_RUNTIME_DIR"] = str(base / "cache"), str(base / "run")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def served_artifact(tmp_path_factory):
    """The default model exported to ONNX Runtime (fp32), as a user would serve it; read-only."""
    from pltkit.export.artifact import export

    return export("default", tmp_path_factory.mktemp("served") / "default-fp32")
