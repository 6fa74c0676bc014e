"""Build the C++ runner (runner/cpp) once per source version; `python -m runner.cpp_build` prints
the executable's path.

The build goes to the user's cache, <cache>/runner/<hash>/ (kernels.build.build_root: $SPINQUANT_CACHE,
else ~/.cache/spinquant), never into the package. The hash covers the runner's sources, our kernel
library's (the runner compiles it in), the ExecuTorch and pytorch-tokenizers versions it links and
the Python it takes libpython from.
"""

import argparse
import hashlib
import sys
from importlib.metadata import version
from pathlib import Path

from kernels.build import build_root, cmake_build_once, executorch_cmake_prefix
from kernels.build import source_hash as kernels_source_hash
from spinquant.errors import one_line_errors
from spinquant.quiet import add_verbose_flag

SOURCE_DIR = Path(__file__).parent / "cpp"
BY_HAND_BUILDS = SOURCE_DIR / "build"  # README's cmake commands build here; not sources
EXECUTABLE = "spinquant_runner"


def source_hash() -> str:
    h = hashlib.sha256(f"{kernels_source_hash()}\0{version('pytorch-tokenizers')}\0{sys.executable}".encode())
    for path in sorted(SOURCE_DIR.rglob("*")):
        if path.is_file() and BY_HAND_BUILDS not in path.parents:
            h.update(str(path.relative_to(SOURCE_DIR)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def runner_executable() -> Path:
    """The spinquant_runner executable, built once per source version."""
    options = [f"-DCMAKE_PREFIX_PATH={executorch_cmake_prefix()}", f"-DPython3_EXECUTABLE={sys.executable}"]
    return cmake_build_once("the C++ runner", SOURCE_DIR, build_root("runner"), source_hash(), EXECUTABLE, options) / EXECUTABLE


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m runner.cpp_build", description="Build the C++ runner once per source version; print its path.")
    add_verbose_flag(parser)
    parser.parse_args()
    with one_line_errors("runner.cpp_build"):
        print(runner_executable())
