"""Build the C++ kernel library once per source version, and load it into ExecuTorch's runtime.

The build goes to the user's cache, <cache>/kernels/<hash>/ (<cache> is spinquant.files.cache_dir():
$SPINQUANT_CACHE, else ~/.cache/spinquant), never into the package, which an installed wheel may have
read-only or shared between users. The hash covers the C++ sources, the CMake project and the ExecuTorch
version it compiles against, so editing a source or upgrading ExecuTorch rebuilds and nothing else does;
a checkout and an installed wheel of the same sources share one build.
"""

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from spinquant.errors import UserError
from spinquant.files import cache_dir

SOURCE_DIR = Path(__file__).parent / "cpu"
LIBRARY = "libspinquant_kernels.dylib" if sys.platform == "darwin" else "libspinquant_kernels.so"
OPERATOR = "spinquant::hadamard_transform.out"
MIN_CMAKE = (3, 28)
LOAD_HINT = "call kernels.load_into_executorch_runtime() before loading the program"
MADV_DONTNEED = 4  # Linux's madvise(2) advice: drop the pages from this process; a file's are read again when touched
# A build (or a failed build's staging directory) unused for this long is removed by the next build
# beside it. Not sooner: other checkouts, venvs and users with other sources may share the cache.
UNUSED_BUILD_DAYS = 30


def build_root(part: str = "kernels") -> Path:
    """Where the C++ builds go: <cache>/<part>/<hash>/, outside the package (site-packages may be
    read-only, or shared between users and environments)."""
    return cache_dir() / part


def _executorch_root() -> Path:
    import executorch.version  # the package root without importing the runtime

    return Path(executorch.version.__file__).parent


def source_hash() -> str:
    import executorch.version

    h = hashlib.sha256(executorch.version.__version__.encode())
    for path in sorted(SOURCE_DIR.glob("*")):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def find_cmake(what: str = "the spinquant kernels") -> str:
    """The cmake binary: the PyPI package's first, as it is the one pyproject pins."""
    try:
        import cmake

        binary = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        binary = shutil.which("cmake")
    if binary is None:
        raise UserError(f"building {what} needs cmake: pip install 'cmake>=3.28'")
    version = re.search(r"(\d+)\.(\d+)", subprocess.run([binary, "--version"], capture_output=True, text=True).stdout)
    if version is None or tuple(map(int, version.groups())) < MIN_CMAKE:
        found = version.group(0) if version else "of unknown version"
        raise UserError(f"cmake {found} at {binary} is too old for {what}: pip install 'cmake>=3.28'")
    return binary


def run_step(step: str, command: list[str], log: Path, what: str = "the spinquant kernels") -> None:
    """One build command, its output appended to `log`; a failure is one line naming the log."""
    with log.open("a") as f:
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        text = log.read_text()
        if re.search("No CMAKE_CXX_COMPILER could be found|CMAKE_CXX_COMPILER not set|Could not find the compiler", text):
            raise UserError(
                f"building {what} needs a C++17 compiler: install g++ or clang "
                "(apt-get install g++), or point CXX at one"
            )
        reason = re.search(r"CMake Error[^\n]*:\n((?:.+\n?)+)", text)  # configure's own message, if any
        said = ": " + " ".join(reason.group(1).split("Call Stack")[0].split()) if reason else ""
        raise UserError(f"building {what} failed at {step}{said}; see {log}")


def cmake_build_once(what: str, source: Path, build_root: Path, key: str, product: str, options: list[str]) -> Path:
    """build_root/<key>/, holding `product` built by CMake from `source`; built when missing.

    The build runs in a temporary directory renamed into place, so a concurrent or interrupted build
    never leaves a half-built directory under the key. Each use marks the build used; builds of other
    keys unused for UNUSED_BUILD_DAYS are removed."""
    target = build_root / key
    if (target / product).exists():
        _mark_used(target)
        return target
    build_root.mkdir(parents=True, exist_ok=True)
    print(f"{what}: building {target} (once per source change)", file=sys.stderr)
    cmake = find_cmake(what)
    staging = Path(tempfile.mkdtemp(dir=build_root, prefix="tmp-"))
    log = staging / "build.log"
    run_step("configure", [cmake, "-S", str(source), "-B", str(staging), *options], log, what)
    run_step("compile", [cmake, "--build", str(staging), "-j", str(os.cpu_count() or 1)], log, what)
    try:
        staging.rename(target)  # atomic: a concurrent build of the same sources may have won
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_unused(build_root, keep=target)
    return target


def _mark_used(build: Path) -> None:
    try:
        os.utime(build)
    except OSError:  # a cache we may read but not write: nothing to record
        pass


def _remove_unused(build_root: Path, keep: Path) -> None:
    """Remove builds of other sources (and failed builds' staging directories) unused for a while."""
    cutoff = time.time() - UNUSED_BUILD_DAYS * 86400
    for old in build_root.iterdir():
        if old != keep and old.is_dir() and re.fullmatch("[0-9a-f]+|tmp-.+", old.name) and old.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)


def executorch_cmake_prefix() -> Path:
    """Where find_package(executorch CONFIG) finds the wheel's CMake package."""
    return _executorch_root() / "share" / "cmake"


def build_dir() -> Path:
    """The build directory holding the library, the C++ tests and bench_hadamard; built if missing."""
    options = [f"-DCMAKE_PREFIX_PATH={executorch_cmake_prefix()}"]
    return cmake_build_once("the spinquant kernels", SOURCE_DIR, build_root("kernels"), source_hash(), LIBRARY, options)


def build_library() -> Path:
    """The shared library with `spinquant::hadamard_transform.out`, built once per source version.

    $SPINQUANT_KERNEL_LIBRARY names a prebuilt one instead: an interpreter with no compiler, such as
    the arm64 Python under qemu that runner/arm64.py runs, loads the library cross-built for it."""
    if prebuilt := os.environ.get("SPINQUANT_KERNEL_LIBRARY"):
        if not Path(prebuilt).is_file():
            raise UserError(f"SPINQUANT_KERNEL_LIBRARY={prebuilt}: no such file")
        return Path(prebuilt)
    return build_dir() / LIBRARY


@functools.cache
def load_into_executorch_runtime() -> Path:
    """Register our kernels in the ExecuTorch runtime this process uses; safe to call repeatedly. Once per process: a
    second build (the sources edited meanwhile) would register the same operators again, which ExecuTorch aborts on."""
    from executorch.runtime import Runtime  # first: the library binds to this runtime's registry

    library = build_library()
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    if OPERATOR not in Runtime.get().operator_registry.operator_names:
        raise UserError(
            f"{library} loaded but {OPERATOR} is not in ExecuTorch's operator registry: "
            "the library was linked against another copy of the runtime"
        )
    return library


def needs_our_kernels(program: bytes) -> bool:
    """Whether a serialized program calls one of our operators (operator names are stored as plain text)."""
    return b"spinquant::" in program


@dataclass
class LoadedProgram:
    """A program with every method loaded; hold it while using the methods (a method does not keep
    its program alive)."""

    program: object
    methods: dict


def load_program(program: Path | bytes) -> LoadedProgram:
    """A .pte in ExecuTorch's Python runtime, every method loaded once so that a missing kernel shows
    here. ExecuTorch reports one as "Failed to load method ..., error: 0x:14" (its log names the
    operator); when ours is the one missing, this says how to fix it."""
    from executorch.runtime import Runtime

    runtime = Runtime.get()
    # A path, not its bytes: the runtime then reads the file itself and holds no second copy of it
    # (a 0.97 GB program: 2.1 GB resident once loaded, against 2.7 GB from bytes).
    loaded = runtime.load_program(program if isinstance(program, bytes) else Path(program))
    if not isinstance(program, bytes):
        release_mapped_pages(Path(program))  # before the methods load, so not resident while XNNPACK packs (the load's peak)
    try:
        methods = {name: loaded.load_method(name) for name in sorted(loaded.method_names)}
    except RuntimeError as e:
        data = program if isinstance(program, bytes) else Path(program).read_bytes()
        if needs_our_kernels(data) and OPERATOR not in runtime.operator_registry.operator_names:
            raise UserError(f"the program needs our spinquant:: kernels, which ExecuTorch's runtime does not have: {LOAD_HINT}") from e
        raise
    return LoadedProgram(loaded, methods)


def release_mapped_pages(path: Path) -> None:
    """The pybindings map a program with mlock() (their MmapDataLoader's UseMlockIgnoreErrors), so the constant
    segment, mapped for the program's life with the quantized embedding in it, stays resident whole (Llama 3.2
    1B's shapes: 251 MiB, results/memory.md). Unlocked and dropped from this process, its pages are read back
    from the page cache as the program uses them, as with ExecuTorch's Module::LoadMode::Mmap (runner/cpp's):
    of the embedding, the pages of the tokens seen."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():  # not Linux: the mappings cannot be listed, and stay as the runtime made them
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            libc.munlock(ctypes.c_void_p(start), ctypes.c_size_t(end - start))
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
