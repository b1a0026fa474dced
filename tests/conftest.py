"""Shared fixtures: an isolated store, tiny models of each family, the real GGUF."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton decides between interpreting and compiling when a kernel module is
    # first imported: without a GPU, every kernel test runs in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))


def _import_hugging_faces_kernels_package() -> None:
    """transformers (5.25 on) imports the Hugging Face package `kernels` whenever it is installed, as transformers now
    requires; `python -m pytest` puts the repo root first on sys.path, where our `kernels/` folder (installed as
    ffchat.kernels) would answer that import and break every test that builds a model with transformers. Importing the
    installed package with the repo root left out puts the right module in sys.modules before transformers asks."""
    root = Path(__file__).resolve().parent.parent
    saved = sys.path[:]
    sys.path[:] = [entry for entry in saved if Path(entry or ".").resolve() != root]
    try:
        import kernels  # noqa: F401
    except ImportError:  # not installed: transformers will not import it either
        pass
    finally:
        sys.path[:] = saved


_import_hugging_faces_kernels_package()

from factory import FAMILIES, build_model  # noqa: E402
from real_model import smollm2_gguf  # noqa: E402


# The machine's Hugging Face settings must not reach a test (HF_HUB_CACHE would
# even win over the test's HF_HOME, and a token or endpoint would change answers).
HUB_VARIABLES = (
    "HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
)


@pytest.fixture(autouse=True)
def ffchat_home(tmp_path, monkeypatch):
    """Every test gets its own empty store and Hugging Face cache; nothing touches ~/.cache."""
    for name in HUB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "ffchat-home"
    monkeypatch.setenv("FFCHAT_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Build (once per session) and return the directory of a tiny model of a family."""
    built: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in built:
            built[family] = build_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return built[family]

    return get


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    return smollm2_gguf()
