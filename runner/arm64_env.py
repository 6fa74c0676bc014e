"""The arm64 environment: Debian's arm64 Python, the arm64 torch/executorch wheels, our kernel library
cross-built for it, run under qemu-aarch64. Prepared once into <cache>/arm64/<key>/ (<cache> is
spinquant.files.cache_dir()); downloads are kept in <cache>/arm64/downloads/ for the next key.

Layout of an environment:
  root/   Debian arm64 packages unpacked (dpkg -x): python3.11 and the C libraries; qemu's -L
  site/   the arm64 wheels (pip install --platform manylinux_2_28_aarch64 --target)
  stubs/  stand-ins for the CUDA libraries PyPI's arm64 torch links against (runner/arm64_stubs.py)
  libspinquant_kernels.so   kernels/cpu cross-built against site/executorch
"""

import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runner import arm64_stubs
from spinquant.errors import UserError
from spinquant.files import cache_dir

PLATFORM = "manylinux_2_28_aarch64"
# Debian 12 (bookworm)'s arm64 python3 is 3.11, so the wheels are cp311 ones.
PYTHON_VERSION = "3.11"
DEBS = [
    "python3.11:arm64", "python3.11-minimal:arm64", "libpython3.11-minimal:arm64", "libpython3.11-stdlib:arm64",
    "libc6:arm64", "gcc-12-base:arm64", "libgcc-s1:arm64", "libstdc++6:arm64", "libgomp1:arm64",
    "zlib1g:arm64", "libbz2-1.0:arm64", "liblzma5:arm64", "libffi8:arm64", "libssl3:arm64", "libexpat1:arm64",
    "libcrypt1:arm64", "libdb5.3:arm64", "libncursesw6:arm64", "libtinfo6:arm64", "libreadline8:arm64",
    "libsqlite3-0:arm64", "libuuid1:arm64", "libnsl2:arm64", "libtirpc3:arm64", "libgssapi-krb5-2:arm64",
    "libkrb5-3:arm64", "libk5crypto3:arm64", "libkrb5support0:arm64", "libkeyutils1:arm64", "libcom-err2:arm64",
    "media-types",
]
# What `import torch`, executorch's runtime, its LLM ops and quantized kernels import (no more:
# each is pinned to the version this machine's x86 environment has, when it has one).
WHEELS = [
    "torch", "executorch", "torchao", "numpy", "typing_extensions", "sympy", "mpmath", "networkx", "jinja2",
    "markupsafe", "filelock", "fsspec", "packaging", "flatbuffers", "pyyaml", "ruamel.yaml", "tabulate",
    "wcwidth", "tqdm", "certifi",
]
# qemu-user 7.2 shows the guest the host's x86 /proc/cpuinfo, on which pytorch/cpuinfo's arm64 parser
# crashes (torch's first kernel dispatch, XNNPACK's init). qemu's -L finds root/proc/cpuinfo first:
# two Neoverse-N1 cores. The features XNNPACK picks kernels by come from the auxiliary vector
# (HWCAP), which qemu fills from its emulated CPU ("max"), not from this file.
CPUINFO_CORE = """processor\t: {i}
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

"""
REPO = Path(__file__).resolve().parent.parent
# The emulated CPU. qemu's "max" (every feature qemu 7.2 emulates) makes XNNPACK take SME kernels,
# whose logits came out wrong under Debian 12's qemu 7.2 (tiny program: top-1 agreement 0 with x86,
# while "max,sme=off" and "neoverse-n1" agree to 1e-7 relative; the demo: results/arm64.md), not yet
# told apart from a qemu SME bug. So SME is off unless --cpu max asks.
DEFAULT_CPU = "max,sme=off"


def say(message: str) -> None:
    print(f"arm64: {message}", file=sys.stderr, flush=True)


def pinned(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name).split('+')[0]}"  # 2.13.0+cpu: the x86 build's tag
    except importlib.metadata.PackageNotFoundError:
        return name


def requirements() -> list[str]:
    return [pinned(name) for name in WHEELS]


def arm64_root() -> Path:
    return cache_dir() / "arm64"


def env_key() -> str:
    """Changes with anything that goes into an environment: packages, stub generator, kernel sources."""
    import kernels.build

    h = hashlib.sha256("\n".join([PLATFORM, PYTHON_VERSION, *DEBS, *requirements(), CPUINFO_CORE]).encode())
    h.update(Path(arm64_stubs.__file__).read_bytes())
    h.update(kernels.build.source_hash().encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Arm64Env:
    path: Path

    @property
    def sysroot(self) -> Path:
        return self.path / "root"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / f"python{PYTHON_VERSION}"

    @property
    def kernel_library(self) -> Path:
        return self.path / "libspinquant_kernels.so"

    def command(self, args: list[str], threads: int = 1, cpu: str = DEFAULT_CPU, qemu_options: tuple[str, ...] = ()) -> list[str]:
        """`python3.11 args...` under qemu (emulating `cpu`, with `qemu_options` such as its -d logging)
        with this environment and this checkout's code."""
        env = {
            "PYTHONPATH": f"{self.path / 'site'}:{REPO}",
            "LD_LIBRARY_PATH": str(self.path / "stubs"),
            "SPINQUANT_KERNEL_LIBRARY": str(self.kernel_library),
            "OMP_NUM_THREADS": str(threads),
            "PYTHONDONTWRITEBYTECODE": "1",  # the checkout's __pycache__ stays x86 Python's
        }
        qemu = [tool("qemu-aarch64", "qemu-user"), "-cpu", cpu, "-L", str(self.sysroot), *qemu_options]
        for name, value in env.items():
            qemu += ["-E", f"{name}={value}"]
        return [*qemu, str(self.python), *args]


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise UserError(f"the arm64 environment needs {name}: apt-get install {package}")
    return found


def run(command: list[str], what: str, log: Path) -> None:
    with log.open("a") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        raise UserError(f"preparing the arm64 environment failed at {what}: {tail} (log: {log})")


def ensure_apt_arm64(log: Path) -> None:
    """Debian's arm64 package lists: `dpkg --add-architecture arm64 && apt-get update`, once."""
    archs = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    if "arm64" in archs:
        return
    if os.geteuid() != 0:
        raise UserError("the arm64 environment needs Debian's arm64 packages: sudo dpkg --add-architecture arm64 && sudo apt-get update")
    say("adding Debian's arm64 architecture (dpkg --add-architecture arm64, apt-get update)")
    run(["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture", log)
    run(["apt-get", "update", "-qq"], "apt-get update", log)


def download_debs(downloads: Path, log: Path) -> list[Path]:
    debs = downloads / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    ensure_apt_arm64(log)
    say(f"downloading {len(DEBS)} Debian arm64 packages into {debs}")
    result = subprocess.run(["apt-get", "download", *DEBS], cwd=debs, capture_output=True, text=True)
    if result.returncode != 0 and os.geteuid() == 0 and "Unable to locate" in result.stderr:
        run(["apt-get", "update", "-qq"], "apt-get update", log)  # stale lists
        result = subprocess.run(["apt-get", "download", *DEBS], cwd=debs, capture_output=True, text=True)
    with log.open("a") as f:
        f.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise UserError(f"apt-get download of the arm64 packages failed: {result.stderr.strip().splitlines()[-1]} (log: {log})")
    return sorted(debs.glob("*.deb"))


def pip_for_arm64(command: str) -> list[str]:
    """`pip <command>` for the arm64 wheels: this platform's binaries, no dependency resolution (WHEELS lists them)."""
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", command, "-q",
            "--platform", PLATFORM, "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--no-deps"]


def download_wheels(downloads: Path, log: Path) -> Path:
    wheels = downloads / "wheels"
    say(f"downloading the arm64 wheels into {wheels} (torch's is 0.43 GB; kept for the next time)")
    run([*pip_for_arm64("download"), "-d", str(wheels), *requirements()], "pip download", log)
    return wheels


def install_wheels(wheels: Path, site: Path, log: Path) -> None:
    say(f"installing the wheels for {PLATFORM} into {site}")
    run([*pip_for_arm64("install"), "--no-index", "--find-links", str(wheels), "--target", str(site), *requirements()], "pip install --target", log)


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def make_stubs(staging: Path) -> list[str]:
    """Stubs for every library that torch's and executorch's arm64 binaries need and nothing here has."""
    site, root = staging / "site", staging / "root"
    binaries = [p for d in (site / "torch", site / "executorch") for p in d.rglob("*.so*") if p.is_file() and is_elf(p)]
    others = [p for p in root.rglob("*.so*") if p.is_file() and is_elf(p)] + [root / "usr" / "bin" / f"python{PYTHON_VERSION}"]
    others += [p for p in site.rglob("*.so*") if p.is_file() and is_elf(p) and p not in binaries]
    return arm64_stubs.build_stubs(binaries, others, staging / "stubs")


def build_kernels(staging: Path, log: Path) -> None:
    """kernels/cpu's shared library, cross-compiled against the arm64 wheel's ExecuTorch."""
    import kernels.build

    cxx = tool("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")
    cmake, build = kernels.build.find_cmake(), staging / "kernels-build"
    say("cross-compiling the kernel library for arm64")
    configure = [
        cmake, "-S", str(kernels.build.SOURCE_DIR), "-B", str(build),
        f"-DCMAKE_PREFIX_PATH={staging / 'site' / 'executorch' / 'share' / 'cmake'}",
        "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64", f"-DCMAKE_CXX_COMPILER={cxx}",
    ]
    # kernels.build's own step runner: a missing compiler or CMake's error comes out as one line, as for the x86 build.
    kernels.build.run_step("configure", configure, log, "the arm64 kernel library")
    kernels.build.run_step("compile", [cmake, "--build", str(build), "--target", "spinquant_kernels", "-j", "1"], log, "the arm64 kernel library")
    shutil.copy2(build / kernels.build.LIBRARY, staging / "libspinquant_kernels.so")
    shutil.rmtree(build)


def smoke_test(env: Arm64Env, log: Path) -> None:
    """The runtime starts under qemu with every kernel a program needs (about a minute: torch's import)."""
    say("checking the environment under qemu-aarch64 (about a minute)")
    script = "import platform, runner.pte; runner.pte.load_runtime_kernels(); print('ok', platform.machine())"
    result = subprocess.run(env.command(["-c", script]), capture_output=True, text=True, cwd=REPO)
    with log.open("a") as f:
        f.write(result.stdout + result.stderr)
    if result.returncode != 0 or "ok aarch64" not in result.stdout:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the arm64 environment does not start: {last} (log: {log})")


def prepare(check: bool = True) -> Arm64Env:
    """The cached environment, prepared when missing; built in a staging directory renamed into place."""
    if platform.system() != "Linux" or not shutil.which("apt-get"):
        raise UserError("the arm64 environment is prepared from Debian's packages: it needs a Debian/Ubuntu Linux host")
    tool("qemu-aarch64", "qemu-user")
    tool("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")
    top = arm64_root()
    env = Arm64Env(top / env_key())
    if (env.path / "ready").exists():
        return env
    top.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=top, prefix="tmp-"))
    log = staging / "prepare.log"
    say(f"preparing {env.path} (once; log: {log})")
    downloads = top / "downloads"
    for deb in download_debs(downloads, log):
        run(["dpkg", "-x", str(deb), str(staging / "root")], f"dpkg -x {deb.name}", log)
    (staging / "root" / "proc").mkdir(exist_ok=True)
    (staging / "root" / "proc" / "cpuinfo").write_text("".join(CPUINFO_CORE.format(i=i) for i in range(2)))
    install_wheels(download_wheels(downloads, log), staging / "site", log)
    say(f"stubbing the CUDA libraries torch's arm64 wheel links: {len(make_stubs(staging))} libraries")
    build_kernels(staging, log)
    if check:
        smoke_test(Arm64Env(staging), log)
    (staging / "ready").write_text("ok\n")
    try:
        staging.rename(env.path)  # atomic: a concurrent prepare may have won
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"ready: {env.path}")
    return env
