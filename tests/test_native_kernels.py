"""lowbit's CPU kernels checked on their own, without PyTorch (``tests/native/wq_check.cpp``):
built for this CPU, and for AArch64 to run under qemu-aarch64, which is how the NEON path is
checked on an x86 machine (Debian's ``g++-aarch64-linux-gnu`` and ``qemu-user``; the test
skips, saying so, where either is missing)."""

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).parents[1] / "lowbit" / "kernels" / "csrc"
CHECK = Path(__file__).parent / "native" / "wq_check.cpp"


def _run(compiler: str, flags: list[str], runner: list[str], exe: Path) -> str:
    build = subprocess.run(
        [compiler, "-std=c++17", "-O2", *flags, "-I", str(CSRC), str(CHECK), "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "FAIL" not in run.stdout
    return run.stdout


def test_every_kernel_path_of_this_cpu_standalone(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler here")
    out = _run(compiler, [], [], tmp_path / "wq_check")
    paths = out.splitlines()[0].split()[1:]
    assert "portable" in paths
    if platform.machine() in ("x86_64", "AMD64"):
        assert "avx2" in paths or "avx512" in paths or len(paths) == 1
    passed, total = out.splitlines()[-1].split()[0:3:2]
    assert passed == total and int(total) >= 100 * len(paths), out.splitlines()[-1]


def test_neon_path_under_qemu(tmp_path):
    compiler, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if compiler is None or qemu is None:
        pytest.skip("the NEON check needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: g++-aarch64-linux-gnu, qemu-user)")
    out = _run(compiler, ["-static"], [qemu], tmp_path / "wq_check_aarch64")
    assert out.splitlines()[0].split()[1:] == ["portable", "neon"]
    passed, total = out.splitlines()[-1].split()[0:3:2]
    assert passed == total and int(total) >= 100, out.splitlines()[-1]
