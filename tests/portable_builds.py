"""A CPU kernel built as for a CPU without AVX-512, so tests run its 8-lane path here too."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from flashserve.layers import native


def without_avx512(kernels: native.NativeLibrary, folder: Path) -> native.NativeLibrary:
    """`kernels` compiled with -mno-avx512f into `folder` and loaded (skips the test where
    no x86-64 C compiler is)."""
    compiler = shutil.which("cc")
    if compiler is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs an x86-64 C compiler")
    library = folder / f"{kernels.source.stem}.so"
    command = [compiler, *native.FLAGS, "-mno-avx512f", str(kernels.source), "-o", str(library)]
    subprocess.run([*command, "-lm"], check=True)
    portable = kernels.fresh()
    native.thread_pool()  # loaded globally: the kernel links against it
    portable._library = portable._bind(ctypes.CDLL(str(library)))
    return portable
