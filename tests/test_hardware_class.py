"""device_class: the key of a bundle's latency expectation, from board name and cpuinfo."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.hardware import classify_device, cpu_flags, device_class
from edgefleet.agent.protocol import Hardware

X86_AVX512 = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw\n"
)
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
X86_OLD = "processor\t: 0\nflags\t\t: fpu sse2 sse4_2\n"
ARM = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid asimddp\n"


@pytest.mark.parametrize(
    ("machine", "board", "cpuinfo", "expected"),
    [
        ("aarch64", "Raspberry Pi 5 Model B Rev 1.0", ARM, "rpi5"),
        ("aarch64", "Raspberry Pi 4 Model B Rev 1.4", ARM, "rpi4"),
        ("armv7l", "Raspberry Pi Compute Module 4 Rev 1.0", "", "rpi"),
        ("aarch64", "NVIDIA Jetson Orin Nano Developer Kit", ARM, "jetson-orin-nano"),
        ("aarch64", "NVIDIA Jetson AGX Orin", ARM, "jetson-agx-orin"),
        ("aarch64", "NVIDIA Jetson Xavier NX Developer Kit", ARM, "jetson-xavier-nx"),
        ("x86_64", None, X86_AVX512, "x86-avx512"),
        ("x86_64", None, X86_AVX2, "x86-avx2"),
        ("x86_64", None, X86_OLD, "x86"),
        ("AMD64", None, "", "x86"),
        ("aarch64", None, ARM, "aarch64"),
        ("aarch64", "Rockchip RK3588 EVB", ARM, "aarch64"),
    ],
)
def test_classify_device(machine: str, board: str | None, cpuinfo: str, expected: str) -> None:
    assert classify_device(machine, board, cpuinfo) == expected


def test_cpu_flags_reads_x86_flags_and_arm_features() -> None:
    assert "avx2" in cpu_flags(X86_AVX2)
    assert "asimddp" in cpu_flags(ARM)
    assert cpu_flags("no such line\n") == frozenset()


def test_device_class_reads_the_cpuinfo_file(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(X86_AVX2)
    hw = Hardware(machine="x86_64", system="Linux", cpu_count=4, ram_mb=8000.0)
    assert device_class(hw, cpuinfo) == "x86-avx2"
    assert device_class(hw, tmp_path / "missing") == "x86"
    pi = hw.model_copy(update={"machine": "aarch64", "device_model": "Raspberry Pi 5 Model B"})
    assert device_class(pi, cpuinfo) == "rpi5"
