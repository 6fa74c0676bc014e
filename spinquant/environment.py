"""What machine and library versions produced a number: recorded beside every result."""

import platform
from importlib.metadata import PackageNotFoundError, version

import torch

LIBRARIES = ("torch", "executorch", "torchao", "transformers", "gguf")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def describe_environment() -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {_cpu_name()}"
    return dict(
        device=device,
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        **{lib: _version(lib) for lib in LIBRARIES},
    )


def environment_line() -> str:
    return ", ".join(f"{k} {v}" for k, v in describe_environment().items())
