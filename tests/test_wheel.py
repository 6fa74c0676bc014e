"""An installed wheel works: it carries everything the package reads at run time (the C++ sources that
kernels/build.py and runner/cpp_build.py compile, the data and the committed rotations), and the C++
builds go to the user's cache, never into the package (site-packages may be read-only or shared)."""

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import kernels.build
import runner.cpp_build

REPO = Path(__file__).resolve().parents[1]
# What a clean checkout has: no builds, caches or programs (setuptools would ship a stale build/lib).
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "out", "*.egg-info", "__pycache__", ".pytest_cache", "*.pte")


def in_package(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def files_the_builds_need() -> set[str]:
    """Every file the kernel's and the runner's source hashes cover, and the kernel's CMake hooks."""
    kernel = {in_package(p) for p in kernels.build.SOURCE_DIR.iterdir() if p.is_file()}
    runner_cpp = {
        in_package(p)
        for p in runner.cpp_build.SOURCE_DIR.rglob("*")
        if p.is_file() and runner.cpp_build.BY_HAND_BUILDS not in p.parents
    }
    hooks = {in_package(p) for p in (REPO / "kernels").glob("*.cmake")}
    return kernel | runner_cpp | hooks


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    """The names in a wheel built from a clean copy of the checkout (not in place: pip would write
    build/ and *.egg-info into the shared checkout, and a stale build/lib could hide a dropped file)."""
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, tmp / "src", ignore=NOT_SOURCES)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(tmp / "src")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_the_wheel_carries_the_cpp_sources(wheel_files):
    needed = files_the_builds_need()
    assert {"kernels/cpu/CMakeLists.txt", "kernels/cpu/op_hadamard_transform.cpp", "runner/cpp/CMakeLists.txt"} <= needed
    assert needed - wheel_files == set()


def test_the_wheel_carries_the_data_and_rotations(wheel_files):
    data = {f"spinquant/texts/wikitext2/{name}" for name in ("calib.txt", "eval.txt", "README.md")}
    data |= {f"spinquant/texts/devils_dictionary/{name}" for name in ("eval.txt", "README.md")}
    assert data | {"spinquant/rotations/smollm2_w4a8.pt"} <= wheel_files


def test_the_wheel_holds_no_builds(wheel_files):
    assert not [name for name in wheel_files if "/build/" in name or name.endswith((".so", ".o", ".pte"))]


def test_cpp_builds_go_to_the_cache_not_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SPINQUANT_CACHE", str(tmp_path))
    roots = []

    def record(what, source, build_root, key, product, options):
        roots.append(build_root)
        return build_root / key

    monkeypatch.setattr(kernels.build, "cmake_build_once", record)
    monkeypatch.setattr(runner.cpp_build, "cmake_build_once", record)
    kernels.build.build_dir()
    runner.cpp_build.runner_executable()
    assert roots == [tmp_path / "kernels", tmp_path / "runner"]


TOY_PROJECT = """cmake_minimum_required(VERSION 3.28)
project(toy NONE)
file(WRITE ${CMAKE_BINARY_DIR}/product "built")
"""


def test_a_build_is_made_once_and_old_unused_builds_go(tmp_path):
    """cmake_build_once on a project without a compiler: a build of other sources used recently stays
    (another checkout or venv sharing the cache may need it), one unused for 30 days goes."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "CMakeLists.txt").write_text(TOY_PROJECT)
    root = tmp_path / "cache" / "kernels"
    recent, unused, failed = root / ("1" * 16), root / ("2" * 16), root / "tmp-abc"
    month_ago = time.time() - 31 * 86400
    for build in (recent, unused, failed):
        build.mkdir(parents=True)
    for build in (unused, failed):
        os.utime(build, (month_ago, month_ago))

    built = kernels.build.cmake_build_once("toy", tmp_path / "src", root, "a" * 16, "product", [])
    assert built == root / ("a" * 16) and (built / "product").read_text() == "built"
    assert sorted(p.name for p in root.iterdir()) == sorted([built.name, recent.name])

    os.utime(built, (month_ago, month_ago))
    assert kernels.build.cmake_build_once("toy", tmp_path / "src", root, "a" * 16, "product", []) == built
    assert built.stat().st_mtime > month_ago + 86400  # a use marks it used
