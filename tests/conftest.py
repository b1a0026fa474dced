"""Shared fixtures: an isolated store, tiny models of each family, the real GGUF."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factory import FAMILIES, build_model  # noqa: E402
from real_model import smollm2_gguf  # noqa: E402


@pytest.fixture(autouse=True)
def ffchat_home(tmp_path, monkeypatch):
    """Every test gets its own empty store and Hugging Face cache; nothing touches ~/.cache."""
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
