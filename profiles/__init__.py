"""Per-GPU profiles: which GPU this is, what it offers, and the kernel parameters to start from.

Each ``*.yaml`` beside this file describes one GPU family: the substrings of the CUDA device
name it matches, published facts (compute capability, SMs, memory bandwidth) and kernel
parameters. A profile that names a ``base`` takes every kernel table it does not set itself
from that profile, so parameters measured on one GPU are written once and other GPUs start
from them until they are measured (``measured_on`` says where a profile's own tables come
from). A GPU no profile matches runs on the root profile's parameters, said so by
``ffchat show``. `ffchat tune` measures this GPU's own tiles on top; its cache
(``ffchat.tuning_cache``) is keyed on ``GpuIdentity``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import yaml

ROOT = "h200"  # the profile every chain of bases ends in: its tables were measured (BENCHMARKS.md)
KERNEL_TABLES = ("gemv_w4a16", "gemv_w4a16_gated", "gemv_w4a8", "gemv_w4a8_gated")
GEMV_KEYS = {"max_n", "max_k", "block_n", "block_k", "num_warps", "num_stages", "split_k", "prefetch",
             "max_registers"}


class ProfileError(ValueError):
    """A shipped profile is malformed: a packaging bug, caught by the tests."""


@dataclass(frozen=True)
class GpuIdentity:
    """What tells one GPU setup from another (the key a tuning result is stored under)."""

    name: str
    capability: tuple[int, int]
    sm_count: int
    driver: str | None
    cuda: str | None
    triton: str

    @classmethod
    def of(cls, device: torch.device) -> GpuIdentity:
        import triton  # only where a GPU is: `ffchat show` and `list` start without it

        props = torch.cuda.get_device_properties(device)
        return cls(props.name, (props.major, props.minor), props.multi_processor_count, driver_version(),
                   torch.version.cuda, triton.__version__)


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (Linux: /proc/driver/nvidia/version), or None where it cannot be read."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    words = text.split()
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  ..."
    return next((w for w in words if w.count(".") >= 1 and w.replace(".", "").isdigit()), None)


@dataclass(frozen=True)
class Profile:
    """One GPU family's facts and kernel tables (tables already resolved through ``base``)."""

    key: str
    name: str
    match: tuple[str, ...]
    capability: tuple[int, int]
    sm_count: int | None
    memory_gb_per_s: float | None
    measured_on: str | None  # the GPU this profile's own tables were swept on; None: all inherited
    tables: dict[str, tuple[dict, ...]]
    inherited_from: str | None  # where the tables it does not set come from

    def describe(self) -> str:
        """One line for `ffchat show`: the profile and where its kernel parameters come from."""
        if self.measured_on and self.inherited_from is None:
            origin = f"kernel tables measured on an {self.measured_on}"
        elif self.measured_on:
            origin = f"some kernel tables measured on an {self.measured_on}, the rest from {self.inherited_from}"
        else:
            origin = f"starting kernel tables from {self.inherited_from}, not yet measured on this GPU"
        return f"{self.key} ({self.name}): {origin}"


@dataclass(frozen=True)
class ProfileChoice:
    """The profile a GPU runs with, and whether one of its ``match`` names matched."""

    identity: GpuIdentity
    profile: Profile
    matched: bool

    def describe(self) -> str:
        if self.matched:
            return self.profile.describe()
        return (f"no profile for {self.identity.name!r} (compute {self.identity.capability[0]}."
                f"{self.identity.capability[1]}, {self.identity.sm_count} SMs): {self.profile.key}'s kernel tables")


def _validate_table(key: str, table_name: str, rows) -> tuple[dict, ...]:
    """Rows in order; a row applies to N <= max_n and K <= max_k (a missing bound: any), the last to every shape."""
    if not isinstance(rows, list) or not rows:
        raise ProfileError(f"profile {key}: {table_name} must be a non-empty list of rows")
    for row in rows:
        if not isinstance(row, dict) or not {"block_n", "block_k", "num_warps"} <= row.keys():
            raise ProfileError(f"profile {key}: {table_name} row {row!r} needs block_n, block_k, num_warps")
        if row.keys() - GEMV_KEYS:
            raise ProfileError(f"profile {key}: {table_name} row has unknown keys {sorted(row.keys() - GEMV_KEYS)}")
    if {"max_n", "max_k"} & rows[-1].keys():
        raise ProfileError(f"profile {key}: the last {table_name} row must take every shape (no max_n, max_k)")
    return tuple(dict(row) for row in rows)


def _read(text: str, key: str) -> dict:
    data = yaml.safe_load(text)
    required = {"name", "match", "capability"}
    if not isinstance(data, dict) or not required <= data.keys():
        raise ProfileError(f"profile {key}: needs {sorted(required)}")
    unknown = data.keys() - required - {"base", "sm_count", "memory_gb_per_s", "measured_on", "kernels"}
    if unknown:
        raise ProfileError(f"profile {key}: unknown keys {sorted(unknown)}")
    if (key == ROOT) == ("base" in data):
        raise ProfileError(f"profile {key}: every profile but {ROOT} names a base, and {ROOT} none")
    kernels = data.get("kernels") or {}
    if kernels.keys() - set(KERNEL_TABLES):
        raise ProfileError(f"profile {key}: unknown kernel tables {sorted(kernels.keys() - set(KERNEL_TABLES))}")
    if kernels and not data.get("measured_on"):
        raise ProfileError(f"profile {key}: kernel tables without measured_on")
    data["kernels"] = {name: _validate_table(key, name, rows) for name, rows in kernels.items()}
    return data


def load_profiles(directory: Path | None = None) -> dict[str, Profile]:
    """Every profile in ``directory`` (default: the shipped ones), tables resolved through their bases."""
    if directory is None:
        files = {Path(f.name).stem: f.read_text() for f in resources.files(__package__).iterdir()
                 if f.name.endswith(".yaml")}
    else:
        files = {path.stem: path.read_text() for path in Path(directory).glob("*.yaml")}
    raw = {key: _read(text, key) for key, text in files.items()}
    if ROOT not in raw:
        raise ProfileError(f"no {ROOT} profile: every base chain must end there")

    def tables(key: str, seen: tuple[str, ...] = ()) -> dict[str, tuple[dict, ...]]:
        if key in seen:
            raise ProfileError(f"profiles {' -> '.join(seen + (key,))}: a cycle of bases")
        if key not in raw:
            raise ProfileError(f"profile {seen[-1]}: unknown base {key!r}")
        own = raw[key]["kernels"]
        if "base" not in raw[key]:
            missing = set(KERNEL_TABLES) - own.keys()
            if missing:
                raise ProfileError(f"profile {key}: the root profile must set {sorted(missing)}")
            return own
        return {**tables(raw[key]["base"], seen + (key,)), **own}

    return {
        key: Profile(
            key=key, name=data["name"], match=tuple(data["match"]), capability=tuple(data["capability"]),
            sm_count=data.get("sm_count"), memory_gb_per_s=data.get("memory_gb_per_s"),
            measured_on=data.get("measured_on"), tables=tables(key),
            inherited_from=data.get("base") if set(KERNEL_TABLES) - data["kernels"].keys() else None,
        )
        for key, data in sorted(raw.items())
    }


@functools.cache
def shipped_profiles() -> dict[str, Profile]:
    return load_profiles()


def choose_profile(identity: GpuIdentity, profiles: dict[str, Profile] | None = None) -> ProfileChoice:
    """The profile whose longest ``match`` substring occurs in the device name (case-insensitive), else the root."""
    profiles = profiles if profiles is not None else shipped_profiles()
    name = identity.name.lower()
    hits = [(len(m), profile) for profile in profiles.values() for m in profile.match if m.lower() in name]
    if hits:
        return ProfileChoice(identity, max(hits, key=lambda hit: hit[0])[1], True)
    return ProfileChoice(identity, profiles[ROOT], False)


@functools.cache
def profile_for_device(device: torch.device) -> ProfileChoice | None:
    """The profile of a CUDA device (None for the CPU: kernels there run in the interpreter, on the root tables)."""
    if device.type != "cuda":
        return None
    return choose_profile(GpuIdentity.of(device))


def kernel_table(name: str, device: torch.device) -> tuple[dict, ...]:
    """The rows of kernel table ``name`` (one of KERNEL_TABLES) for ``device``."""
    choice = profile_for_device(device)
    profile = choice.profile if choice is not None else shipped_profiles()[ROOT]
    return profile.tables[name]


def describe_gpu() -> str:
    """The `ffchat show` line: this machine's GPU profile, or why there is none."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here: models run on the CPU with the reference backend"
    return profile_for_device(torch.device("cuda")).describe()
