"""spinquant::hadamard_transform: the eager op against a dense float64 H, its gradient, its input
checks, torch.export, and the C++ kernel running inside real .pte programs in ExecuTorch's runtime."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kernels
from kernels import gen_tables
from spinquant.errors import UserError
from spinquant.hadamard import SUPPORTED_K, factor_size, hadamard_k, hadamard_matrix, sylvester

REPO = Path(__file__).parent.parent
hadamard_transform = torch.ops.spinquant.hadamard_transform


def reference(x: torch.Tensor, dense_up_to: int = 4096) -> torch.Tensor:
    """x @ hadamard_matrix(n) in float64. Past n = 4096 the dense matrix is too big to build, so
    it is applied as its Kronecker factors H_K ⊗ S_m1 ⊗ S_m2 / √n, each a dense matrix."""
    x64, n = x.double(), x.shape[-1]
    if n <= dense_up_to:
        return x64 @ hadamard_matrix(n)
    k, m = factor_size(n)
    m1 = 2 ** (int(math.log2(m)) // 2)
    m2 = m // m1
    factors = (hadamard_k(k), sylvester(m1), sylvester(m2))
    y = torch.einsum("...abc,ad,be,cf->...def", x64.reshape(*x.shape[:-1], k, m1, m2), *factors)
    return (y / math.sqrt(n)).reshape(x.shape)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |y - ref| over a row, relative to that row's norm, worst row."""
    err = (y.double() - ref).abs().amax(-1) / ref.norm(dim=-1)
    return err.max().item()


def sizes() -> list[int]:
    """Every supported K at m = 1, 2, 16, 128 and the largest 2^m with K·2^m ≤ 32768."""
    out = []
    for k in SUPPORTED_K:
        largest = 2 ** int(math.log2(32768 // k))
        out += sorted({k * m for m in (1, 2, 16, 128, largest) if k * m <= 32768})
    return out


@pytest.mark.parametrize("n", [12 * 256, 28 * 128, 4096])
def test_factored_reference_equals_dense_matrix(n):
    x = torch.randn(2, n, dtype=torch.float64)
    assert (reference(x, dense_up_to=0) - x @ hadamard_matrix(n)).abs().max() < 1e-12


@pytest.mark.parametrize("n", sizes())
def test_eager_op_matches_dense_float64_and_keeps_norm(n):
    x = torch.randn(3, n)
    y = hadamard_transform(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert relative_error(y, reference(x)) <= 1e-5
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_eager_op_other_dtypes(dtype):
    x = torch.randn(4, 2, 1536).to(dtype)
    y = hadamard_transform(x)
    assert y.dtype == dtype
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    assert relative_error(y, reference(x)) <= tolerance


@pytest.mark.parametrize("n", [12 * 128, 20 * 64, 44 * 32])
def test_gradient_is_grad_times_h_transposed(n):
    h = hadamard_matrix(n)
    assert not torch.allclose(h, h.T)  # so the test tells H from Hᵀ
    x = torch.randn(2, n, requires_grad=True)
    g = torch.randn(2, n)
    hadamard_transform(x).backward(g)
    assert relative_error(x.grad, g.double() @ h.T) <= 1e-5


def test_gradcheck_and_gradgradcheck_in_float64():
    x = torch.randn(2, 12 * 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hadamard_transform, (x,))
    assert torch.autograd.gradgradcheck(hadamard_transform, (x,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n", [1536, 2048, 14336, 28 * 1024])
def test_cuda_op_and_its_gradient_match_dense(n):
    """On CUDA the op runs fast-hadamard-transform where installed, else the butterfly and a K×K
    einsum on the GPU; both must give the CPU's dense-checked numbers, forward and backward."""
    x = torch.randn(3, n, device="cuda", requires_grad=True)
    y = hadamard_transform(x)
    assert y.is_cuda
    assert relative_error(y.detach().cpu(), reference(x.detach().cpu())) <= 1e-5
    g = torch.randn_like(y)
    y.backward(g)
    expected = torch.ops.spinquant.hadamard_transform_transposed(g.cpu().double())
    assert relative_error(x.grad.cpu(), expected) <= 1e-5


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: torch.randn(1536, 4).t(), ValueError, "contiguous"),
        (lambda: torch.ones(2, 1536, dtype=torch.int32), TypeError, "torch.int32"),
        (lambda: torch.randn(2, 4352), UserError, "4352"),  # 17·256
    ],
)
def test_bad_inputs_name_the_op(make, error, words):
    with pytest.raises(error, match=words) as info:
        hadamard_transform(make())
    assert "spinquant::hadamard_transform" in str(info.value)


class Rotate(nn.Module):
    def forward(self, x):
        return hadamard_transform(x)


def test_unsupported_size_fails_at_export_not_at_run_time():
    with pytest.raises(UserError, match="spinquant::hadamard_transform.*4352"):
        torch.export.export(Rotate(), (torch.randn(2, 4352),))


def test_export_keeps_the_op_as_one_node():
    ep = torch.export.export(Rotate(), (torch.randn(2, 1536),))
    targets = [str(node.target) for node in ep.graph.nodes]
    assert "spinquant.hadamard_transform.default" in targets
    assert relative_error(ep.module()(x := torch.randn(2, 1536)), reference(x)) <= 1e-5


def test_generated_table_header_is_current():
    assert gen_tables.HEADER.read_text() == gen_tables.render()


def test_missing_compiler_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    log = tmp_path / "build.log"
    command = [kernels.build.find_cmake(), "-S", str(kernels.build.SOURCE_DIR), "-B", str(tmp_path / "b")]
    with pytest.raises(UserError, match="needs a C\\+\\+17 compiler"):
        kernels.build.run_step("configure", command, log)


# ---- the C++ kernel inside ExecuTorch programs ----


@pytest.fixture(scope="session")
def runtime():
    """ExecuTorch's Python runtime with our kernel library built (once) and loaded."""
    from executorch.runtime import Runtime

    kernels.load_into_executorch_runtime()
    return Runtime.get()


def to_pte(module: nn.Module, inputs: tuple, xnnpack: bool = False) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(module, inputs)
    partitioner = [XnnpackPartitioner()] if xnnpack else []
    return to_edge_transform_and_lower(ep, partitioner=partitioner).to_executorch().buffer


class Mlp(nn.Module):
    """Linear layers around the online rotation, as in a rotated Llama MLP."""

    def __init__(self, hidden: int = 64, inner: int = 1536):
        super().__init__()
        self.up, self.down = nn.Linear(hidden, inner), nn.Linear(inner, hidden)

    def forward(self, x):
        return self.down(hadamard_transform(torch.relu(self.up(x))))


def test_pte_with_xnnpack_linears_matches_eager(runtime):
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(5, 64)
    program = to_pte(model, (x,), xnnpack=True)
    assert kernels.build.needs_our_kernels(program)
    loaded = kernels.load_program(program)
    y = loaded.methods["forward"].execute([x])[0]
    with torch.no_grad():
        expected = model(x)
    assert relative_error(y, expected.double()) <= 1e-5


def mapped_kib(path: Path, field: str) -> int:
    """A field of /proc/self/smaps (Size, Rss, Locked), summed over this process's mappings of `path`."""
    total, mapped = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):
            mapped = " ".join(fields[5:]) == str(path.resolve())
        elif mapped and fields[0] == field:
            total += int(fields[1])
    return total


def test_a_program_loaded_from_a_file_keeps_none_of_its_pages_resident(runtime, tmp_path):
    """The pybindings mlock() what they map of a program; load_program hands those pages back to the page
    cache, from which the program reads them again as it uses them."""
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(5, 64)
    path = tmp_path / "mlp.pte"
    path.write_bytes(to_pte(model, (x,)))  # no delegate: the weights stay in the constant segment, mapped for the program's life
    loaded = kernels.load_program(path)
    assert mapped_kib(path, "Size:") >= model.up.weight.nbytes / 1024
    assert mapped_kib(path, "Locked:") == 0 and mapped_kib(path, "Rss:") < model.up.weight.nbytes / 1024  # the program's own tables at most
    y = loaded.methods["forward"].execute([x])[0]
    with torch.no_grad():
        assert relative_error(y, model(x).double()) <= 1e-5


class Many(nn.Module):
    def forward(self, *xs):
        return tuple(hadamard_transform(x) for x in xs)


def kernel_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    """Every K at m = 1, 8, 64, plus many rows of one size so the thread pool splits them."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, k * m, generator=g) for k in SUPPORTED_K for m in (1, 8, 64)]
    xs.append(torch.randn(2, 64, 1536, generator=g))
    return [x.to(dtype) for x in xs]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_cpp_kernel_matches_dense_for_every_k(runtime, dtype, tolerance):
    xs = kernel_inputs(dtype)
    program = kernels.load_program(to_pte(Many(), tuple(xs)))  # referenced: methods need it alive
    ys = program.methods["forward"].execute(xs)
    for x, y in zip(xs, ys, strict=True):
        assert y.dtype == dtype and y.shape == x.shape
        assert relative_error(y, reference(x)) <= tolerance, f"n = {x.shape[-1]}"


def test_pte_without_library_says_how_to_fix(tmp_path):
    path = tmp_path / "rotate.pte"
    path.write_bytes(to_pte(Rotate(), (torch.randn(2, 1536),)))
    script = f"import kernels; kernels.load_program({str(path)!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0
    assert "Missing operator: [0] spinquant::hadamard_transform.out" in result.stderr  # ExecuTorch's log
    assert "kernels.load_into_executorch_runtime()" in result.stderr.splitlines()[-1]


def test_cpp_kernel_under_address_and_undefined_behaviour_sanitizers():
    script = REPO / "scripts" / "sanitize_kernels.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(" checks, 0 failures") == 3  # test_transform, test_hadamard and test_e8p_linear


ARM64_CXX, QEMU_ARM64 = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")


@pytest.mark.skipif(not (ARM64_CXX and QEMU_ARM64), reason="needs g++-aarch64-linux-gnu and qemu-user (apt)")
def test_transform_on_arm64_neon_matches_dense(tmp_path):
    """The phones' build: the same generic-vector code compiled for arm64 (NEON) runs the dense
    reference test under qemu."""
    binary = tmp_path / "test_transform"
    source = kernels.build.SOURCE_DIR
    compile_ = [ARM64_CXX, "-std=c++17", "-O2", "-fopenmp-simd", "-static", f"-I{source}", str(source / "test_transform.cpp"), "-o", str(binary)]
    built = subprocess.run(compile_, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    result = subprocess.run([QEMU_ARM64, str(binary)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("ok:"), result.stdout[-3000:]


@pytest.mark.skipif(not ARM64_CXX, reason="needs g++-aarch64-linux-gnu (apt)")
def test_kernel_library_cross_compiles_for_arm64(tmp_path):
    """The static target an Android app links whole-archive builds for arm64 against the wheel's
    ExecuTorch headers (no arm64 ExecuTorch runtime here to link or run it against)."""
    cmake = kernels.build.find_cmake()
    configure = [
        cmake, "-S", str(kernels.build.SOURCE_DIR), "-B", str(tmp_path),
        f"-DCMAKE_PREFIX_PATH={kernels.build.executorch_cmake_prefix()}",
        "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64", f"-DCMAKE_CXX_COMPILER={ARM64_CXX}",
    ]
    for command in (configure, [cmake, "--build", str(tmp_path), "--target", "spinquant_kernels_static"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    archive = (tmp_path / "libspinquant_kernels_static.a").read_bytes()
    elf = archive.find(b"\x7fELF")
    assert int.from_bytes(archive[elf + 18 : elf + 20], "little") == 183  # e_machine: EM_AARCH64
    assert b"hadamard_transform.out" in archive  # the registration came along
