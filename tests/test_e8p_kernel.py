"""`spinquant::e8p_linear` (kernels/e8p_linear_op.py, kernels/cpu/e8p_linear.h, op_e8p_linear.cpp): the eager op against
x @ (scale · decode(codes))ᵀ in float64, its one-line input errors, the C++ test on each vector path (x86 builds by
-march, arm64 NEON under qemu), and the kernel in a .pte against eager."""

import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import kernels
from kernels import gen_tables
from spinquant import e8p

e8p_linear = torch.ops.spinquant.e8p_linear
SOURCE = kernels.build.SOURCE_DIR
# (in, out) of every linear in SmolLM2-135M (hidden 576, kv 192, MLP 1536) and Llama 3.2 1B (2048, 512, 8192).
SMOLLM2 = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
LLAMA_1B = [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]


def random_codes(out: int, in_: int, seed: int) -> torch.Tensor:
    """int16 codes (out, in / 8): all 2¹⁶ values in a random order, repeated (a random subset when fewer)."""
    g = torch.Generator().manual_seed(seed)
    count = out * in_ // 8
    every = torch.randperm(1 << 16, generator=g).repeat(count // (1 << 16) + 1)[:count]
    return every.to(torch.int32).to(torch.int16).reshape(out, in_ // 8)  # bit patterns ≥ 2¹⁵ wrap to negatives


def reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 throughout: the codes as their unsigned values, decoded, scaled, multiplied."""
    unsigned = codes.to(torch.int32) & 0xFFFF
    return x.double() @ (scale.double() * e8p.decode(unsigned).flatten(-2)).T


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    """max |y - expected| over max |expected|."""
    return float((y.double() - expected).abs().max() / expected.abs().max())


def test_int16_codes_decode_as_their_unsigned_bits():
    codes = torch.arange(1 << 16, dtype=torch.int32)
    assert torch.equal(e8p.decode(codes.to(torch.int16)), e8p.decode(codes))


@pytest.mark.parametrize("in_, out", SMOLLM2 + [(2048, 256)])  # 2048·256/8 = 2¹⁶: every code
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_eager_op_matches_float64(in_, out, rows):
    x, codes, scale = torch.randn(rows, in_), random_codes(out, in_, in_ + out), torch.tensor(0.37)
    y = e8p_linear(x, codes, scale)
    assert y.dtype == torch.float32 and y.shape == (rows, out)
    assert relative_error(y, reference(x, codes, scale)) <= 1e-5


@pytest.mark.parametrize(
    "x, codes, scale, error, words",
    [
        (torch.randn(2, 64, dtype=torch.float64), torch.zeros(4, 8, dtype=torch.int16), torch.tensor(1.0), TypeError, "float32"),
        (torch.randn(2, 64), torch.zeros(4, 8, dtype=torch.int32), torch.tensor(1.0), TypeError, "int16"),
        (torch.randn(2, 60), torch.zeros(4, 8, dtype=torch.int16), torch.tensor(1.0), ValueError, "multiple of 8"),
        (torch.randn(2, 64), torch.zeros(4, 7, dtype=torch.int16), torch.tensor(1.0), ValueError, "multiple of 8"),
        (torch.randn(2, 64), torch.zeros(4, 8, dtype=torch.int16), torch.ones(2), ValueError, "one scale"),
        (torch.randn(64, 2).T, torch.zeros(4, 8, dtype=torch.int16), torch.tensor(1.0), ValueError, "contiguous"),
    ],
)
def test_bad_inputs_are_one_line_naming_the_op(x, codes, scale, error, words):
    with pytest.raises(error, match=words) as info:
        e8p_linear(x, codes, scale)
    assert str(info.value).startswith("spinquant::e8p_linear:") and "\n" not in str(info.value)


class E8PLinear(nn.Module):
    def __init__(self, in_: int, out: int, seed: int):
        super().__init__()
        self.register_buffer("codes", random_codes(out, in_, seed))
        self.register_buffer("scale", torch.tensor(0.37))

    def forward(self, x):
        return e8p_linear(x, self.codes, self.scale)


def test_bad_shape_fails_at_export():
    with pytest.raises(ValueError, match="spinquant::e8p_linear: in_features"):
        torch.export.export(E8PLinear(64, 4, 0), (torch.randn(2, 72),))


class Many(nn.Module):
    """One E8P linear per shape, each on its own input."""

    def __init__(self, shapes: list[tuple[int, int]]):
        super().__init__()
        self.linears = nn.ModuleList(E8PLinear(in_, out, in_ + out) for in_, out in shapes)

    def forward(self, *xs):
        return tuple(linear(x) for linear, x in zip(self.linears, xs, strict=True))


@pytest.mark.parametrize("rows", [1, 17])
def test_cpp_kernel_in_a_program_matches_eager(rows):
    from executorch.exir import to_edge

    kernels.load_into_executorch_runtime()
    shapes = SMOLLM2 + LLAMA_1B[1:3]  # the program holds the codes: the largest Llama shapes are the C++ test's
    xs = tuple(torch.randn(rows, in_) for in_, _ in shapes) + (torch.randn(2, 3, 576),)  # and a 3-D input
    model = Many(shapes + [(576, 192)])
    program = to_edge(torch.export.export(model, xs)).to_executorch().buffer
    ys = kernels.load_program(program).methods["forward"].execute(list(xs))
    for x, y, linear in zip(xs, ys, model.linears, strict=True):
        expected = e8p_linear(x, linear.codes, linear.scale)
        assert y.shape == expected.shape and relative_error(y, expected.double()) <= 1e-4
        assert relative_error(y, reference(x, linear.codes, linear.scale)) <= 1e-4


def test_generated_table_header_is_current():
    assert gen_tables.E8P_HEADER.read_text() == gen_tables.render_e8p()


def run_cpp_test(compile_: list[str], binary: Path, runner: list[str]) -> str:
    built = subprocess.run([*compile_, str(SOURCE / "test_e8p_linear.cpp"), "-o", str(binary)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    result = subprocess.run([*runner, str(binary)], capture_output=True, text=True)
    assert result.returncode == 0 and "ok:" in result.stdout.splitlines()[-1], result.stdout[-3000:]
    return result.stdout


FLAGS = ["-std=c++17", "-O2", "-fopenmp-simd", "-ffp-contract=off", f"-I{SOURCE}"]
HOST_CXX = shutil.which("g++") or shutil.which("c++")
CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()


@pytest.mark.skipif(platform.machine() != "x86_64" or not HOST_CXX, reason="needs an x86-64 host with g++")
@pytest.mark.parametrize("march, path, needs", [("x86-64", "scalar", None), ("x86-64-v3", "avx2", "avx2"), ("x86-64-v4", "avx512", "avx512f")])
def test_cpp_test_on_each_x86_path(tmp_path, march, path, needs):
    if needs and needs not in CPU_FLAGS:
        pytest.skip(f"this CPU lacks {needs}")
    stdout = run_cpp_test([HOST_CXX, *FLAGS, f"-march={march}"], tmp_path / "test_e8p_linear", [])
    assert stdout.startswith(f"path: {path}\n")


ARM64_CXX, QEMU_ARM64 = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")


@pytest.mark.skipif(not (ARM64_CXX and QEMU_ARM64), reason="needs g++-aarch64-linux-gnu and qemu-user (apt)")
def test_cpp_test_on_arm64_neon(tmp_path):
    stdout = run_cpp_test([ARM64_CXX, *FLAGS, "-static"], tmp_path / "test_e8p_linear", [QEMU_ARM64])
    assert stdout.startswith("path: neon\n")
