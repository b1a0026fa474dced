"""GPU profiles: the shipped YAML files load, GPUs find their profile, kernels read their tables from it."""

from __future__ import annotations

import pytest
import torch

from ffchat import profiles
from ffchat.profiles import ROOT, GpuIdentity, ProfileError, choose_profile, load_profiles

SHIPPED = profiles.shipped_profiles()

# Device names as CUDA reports them, and the profile each must get.
NAMES = {
    "NVIDIA H200": "h200",
    "NVIDIA H100 80GB HBM3": "h100",
    "NVIDIA H100 PCIe": "h100",
    "NVIDIA A100-SXM4-80GB": "a100",
    "NVIDIA A100-PCIE-40GB": "a100",
    "NVIDIA L4": "l4",
    "NVIDIA L40S": "l40s",
    "NVIDIA L40": "l40s",
    "NVIDIA GeForce RTX 4090": "rtx4090",
    "NVIDIA GeForce RTX 3090 Ti": "rtx3090",
    "Orin": "jetson-orin",
}


def identity(name: str) -> GpuIdentity:
    return GpuIdentity(name, (9, 0), 132, "580.159.04", "13.0", "3.6.0")


def test_every_known_gpu_of_the_brief_ships_a_profile():
    assert set(NAMES.values()) <= SHIPPED.keys()
    for profile in SHIPPED.values():
        assert set(profile.tables) == set(profiles.KERNEL_TABLES), profile.key
        assert profile.match and profile.name


@pytest.mark.parametrize("name, key", NAMES.items())
def test_device_names_find_their_profile(name, key):
    choice = choose_profile(identity(name))
    assert choice.matched and choice.profile.key == key


def test_an_unknown_gpu_runs_on_the_root_tables_and_says_so():
    choice = choose_profile(identity("Tesla T4"))
    assert not choice.matched and choice.profile.key == ROOT
    assert "no profile for 'Tesla T4'" in choice.describe()


def test_descriptions_say_where_the_tables_come_from():
    assert SHIPPED[ROOT].describe() == "h200 (NVIDIA H200): kernel tables measured on an H200"
    assert "starting kernel tables from h200, not yet measured" in SHIPPED["rtx4090"].describe()


def test_unmeasured_profiles_inherit_the_root_tables():
    assert SHIPPED["l4"].tables == SHIPPED[ROOT].tables


def write(directory, key, text):
    (directory / f"{key}.yaml").write_text(text)


ROOT_TEXT = """name: Root
match: [Root]
capability: [9, 0]
measured_on: Root
kernels:
  gemv_w4a16: [{block_n: 8, block_k: 1024, num_warps: 4}]
  gemv_w4a16_gated: [{block_n: 8, block_k: 1024, num_warps: 4}]
  gemv_w4a8: [{block_n: 8, block_k: 1024, num_warps: 4}]
  gemv_w4a8_gated: [{block_n: 8, block_k: 1024, num_warps: 4}]
"""


def test_a_profile_overrides_only_the_tables_it_sets(tmp_path):
    write(tmp_path, ROOT, ROOT_TEXT)
    write(tmp_path, "small", """name: Small GPU
match: [Small]
capability: [8, 9]
base: h200
measured_on: Small
kernels:
  gemv_w4a16: [{max_n: 4096, block_n: 4, block_k: 512, num_warps: 2}, {block_n: 16, block_k: 2048, num_warps: 8}]
""")
    loaded = load_profiles(tmp_path)
    small = loaded["small"]
    assert small.tables["gemv_w4a16"][0] == {"max_n": 4096, "block_n": 4, "block_k": 512, "num_warps": 2}
    assert small.tables["gemv_w4a8"] == loaded[ROOT].tables["gemv_w4a8"]
    assert "some kernel tables measured on an Small, the rest from h200" in small.describe()


@pytest.mark.parametrize(
    "other, message",
    [
        ("name: X\nmatch: [X]\ncapability: [8, 0]\n", "names a base"),
        ("name: X\nmatch: [X]\ncapability: [8, 0]\nbase: nowhere\n", "unknown base"),
        ("name: X\nmatch: [X]\ncapability: [8, 0]\nbase: h200\ncolour: red\n", "unknown keys"),
        ("name: X\nmatch: [X]\ncapability: [8, 0]\nbase: h200\nmeasured_on: X\nkernels:\n"
         "  gemv_w4a16: [{max_n: 64, block_n: 8, block_k: 1024, num_warps: 4}]\n", "every shape"),
        ("name: X\nmatch: [X]\ncapability: [8, 0]\nbase: h200\nmeasured_on: X\nkernels:\n"
         "  gemv_w4a16: [{block_n: 8, block_k: 1024}]\n", "needs block_n"),
        ("name: X\nmatch: [X]\ncapability: [8, 0]\nbase: h200\nkernels:\n"
         "  gemv_w4a16: [{block_n: 8, block_k: 1024, num_warps: 4}]\n", "without measured_on"),
        ("name: X\nmatch: [X]\ncapability: [8, 0]\nbase: x\n", "cycle"),
    ],
)
def test_malformed_profiles_are_refused(tmp_path, other, message):
    write(tmp_path, ROOT, ROOT_TEXT)
    write(tmp_path, "x", other)
    with pytest.raises(ProfileError, match=message):
        load_profiles(tmp_path)


def test_the_cpu_has_no_profile_and_kernels_use_the_root_tables():
    from ffchat.kernels import int4_gemv

    cpu = torch.device("cpu")
    assert profiles.profile_for_device(cpu) is None
    table = int4_gemv.config_table("gemv_w4a16", cpu)
    assert [c.block_n for _, _, c in table] == [row["block_n"] for row in SHIPPED[ROOT].tables["gemv_w4a16"]]
    last = SHIPPED[ROOT].tables["gemv_w4a16"][-1]
    assert int4_gemv.pick_config(128256, 2048, 128).block_n == last["block_n"]
