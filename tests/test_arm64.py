"""A .pte made here (x86) runs under qemu-aarch64 in the arm64 environment (runner/arm64_env.py) and
gives the same greedy tokens and logits; the comparison fails when the arm64 run is wrong."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.options import ExportOptions
from export.to_pte import run
from runner.arm64_operators import quantization_multiplier
from runner.record_diff import diff_records
from spinquant.errors import UserError

PROMPT = [5, 17, 33, 2, 60, 7, 11, 40]


def can_prepare() -> str | None:
    """Why the arm64 environment cannot be prepared here, or None."""
    for binary, package in (("qemu-aarch64", "qemu-user"), ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")):
        if not shutil.which(binary):
            return f"needs {package} (apt)"
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        return "needs a Debian/Ubuntu host (the arm64 Python comes from Debian's packages)"
    return None


@pytest.fixture(scope="module")
def arm64_env():
    from runner.arm64_env import prepare

    reason = can_prepare()
    if reason:
        pytest.skip(reason)
    # No smoke test: the comparison below runs the runtime under qemu anyway (saves a minute in CI).
    try:
        return prepare(check=False)
    except UserError as e:  # e.g. no sudo for dpkg --add-architecture, no network: .ci/run reports the skip
        pytest.skip(f"the arm64 environment could not be prepared: {e}")


@pytest.fixture(scope="module")
def tiny_pte(tiny_hf_dir, tmp_path_factory) -> Path:
    """The tiny model's default program (online Hadamard, XNNPACK 8da4w) with every position's logits."""
    opts = ExportOptions(model=str(tiny_hf_dir), max_seq_len=32, full_logits=True, output_dir=tmp_path_factory.mktemp("pte"))
    run(opts.check())
    pte = opts.output_dir / "model.pte"
    assert b"spinquant::hadamard_transform" in pte.read_bytes()  # our kernel runs on arm64 too
    return pte


@pytest.fixture(scope="module")
def records(arm64_env, tiny_pte):
    """The tiny program run on both machines."""
    from runner.arm64 import Decode, compare

    payload = compare(Decode(tiny_pte, PROMPT, 8), tiny_pte.parent / "arm64", trace=True)  # one qemu run for both tests below
    x86, arm64 = (torch.load(tiny_pte.parent / "arm64" / f"{m}.pt") for m in ("x86", "arm64"))
    return payload, x86, arm64


def test_arm64_run_matches_x86(records):
    payload, x86, arm64 = records
    assert x86["machine"] == "x86_64" and arm64["machine"] == "aarch64"
    assert payload["passes"], payload["diff"]
    assert payload["arm64_tokens"] == payload["x86_tokens"] and len(payload["x86_tokens"]) > 0
    diff = payload["diff"]
    assert diff["top1_agreement"] == 1.0 and diff["positions"] == len(PROMPT) + len(payload["x86_tokens"])


def test_a_wrong_arm64_run_fails_the_check(records):
    """Planted faults in the arm64 record: each must fail the comparison."""
    _, x86, arm64 = records
    assert diff_records(x86, arm64).passes()

    scaled = {**arm64, "prompt_logits": arm64["prompt_logits"] * 1.2}  # every logit 20% off
    assert not diff_records(x86, scaled).passes()

    one_position = arm64["prompt_logits"].clone()  # one position's logits swapped for another's
    one_position[3] = arm64["prompt_logits"][4]
    assert not diff_records(x86, {**arm64, "prompt_logits": one_position}).passes()

    tokens = list(arm64["tokens"])
    tokens[-1] = (tokens[-1] + 1) % arm64["prompt_logits"].shape[-1]  # the last greedy token differs
    diff = diff_records(x86, {**arm64, "tokens": tokens})
    assert not diff.passes() and diff.first_different_token == len(tokens) - 1


def test_missing_program_is_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "runner.arm64", "run", "--pte", str(tmp_path / "none.pte"), "--ids", "1,2", "--out", str(tmp_path / "o.pt")],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"runner.arm64: error: program not found: {tmp_path / 'none.pte'}"


def test_prebuilt_kernel_library_must_exist(tmp_path, monkeypatch):
    """The arm64 run loads the cross-built library through $SPINQUANT_KERNEL_LIBRARY: a wrong path is one line."""
    import kernels

    monkeypatch.setenv("SPINQUANT_KERNEL_LIBRARY", str(tmp_path / "none.so"))
    with pytest.raises(UserError, match="SPINQUANT_KERNEL_LIBRARY=.*none.so: no such file"):
        kernels.build_library()


def test_traced_arm64_run_names_the_kernels_that_ran(records):
    """qemu's translation log, placed in the libraries: XNNPACK ran KleidiAI's matmuls, i8mm in the prefill and
    dot-product in the decode steps, and our Hadamard kernel ran; the log itself is not kept."""
    payload, _, _ = records
    report = payload["kernels"]
    xnnpack = report["libexecutorch_backend_xnnpack.so"]
    assert xnnpack["instructions_by_extension"].get("i8mm", 0) > 0
    assert xnnpack["instructions_by_extension"].get("dot-product", 0) > 0
    assert "SME" not in xnnpack["instructions_by_extension"]  # the default emulated CPU has SME off
    assert any(name.startswith("kai_") and "i8mm" in name and kinds.get("i8mm", 0) > 0
               for name, kinds in xnnpack["extensions_by_function"].items())
    assert any("hadamard" in name for name in report["libspinquant_kernels.so"]["instructions_by_function"])
    out = Path(payload["pte"]).parent / "arm64"
    assert (out / "kernels.md").is_file() and not (out / "qemu-in_asm.log").exists()


def test_operator_outputs_show_where_two_runs_part(tiny_pte, tmp_path):
    """Every operator's output of one forward (ETDump's debug buffer): the same run twice logs the same bits, another
    token parts first at the embedding, and a tensor changed in one run is named at its own event."""
    from runner.arm64_operators import differences, operator_outputs, run_forward_with_etdump

    for name, ids in (("a", [5]), ("b", [5]), ("c", [6])):
        run_forward_with_etdump(tiny_pte, ids, tmp_path / name)
    a, b, c = (operator_outputs(tmp_path / name) for name in "abc")
    names = {o.name for o in a}
    assert "spinquant::hadamard_transform.out" in names and "DELEGATE_CALL" in names
    assert differences(a, b) == []
    assert differences(a, c)[0].name == "native_call_embedding_byte.out"

    late = next(i for i, o in enumerate(b) if o.name == "spinquant::rms_norm.out" and i > len(b) // 2)
    changed = b[late].tensors[0].clone()
    changed.view(-1)[7] += 1e-6
    b[late] = type(b[late])(b[late].index, b[late].name, (changed,))
    (first,) = differences(a, b)
    assert (first.index, first.name, first.elements) == (a[late].index, "spinquant::rms_norm.out", 1)


def exact_rounding(x: float, m: float, ties_to_even: bool) -> int:
    """x·m rounded to float32 as a CPU does, then to an integer, in exact rational arithmetic."""
    from fractions import Fraction

    product = Fraction(float(np.float32(float(Fraction(x) * Fraction(m)))))  # a product of two float32 is exact in float64
    whole, rest = divmod(product, 1)
    if rest != Fraction(1, 2):
        return int(whole + (rest > Fraction(1, 2)))
    return int(whole + (whole % 2 if ties_to_even else (1 if product > 0 else 0)))


def row_where_the_multipliers_differ(size: int) -> torch.Tensor:
    """A row in [-5, top] whose float32 multiplier m is not 1/(1/m), with a channel that x86's x·(1/(1/m)) puts on the
    tie 21.5 (to even: 22) and arm64's x·m just below it (21)."""
    for top in np.arange(5, 6, 0.001, dtype=np.float32):
        row = np.zeros(size, np.float32)
        row[0], row[1] = -5, top
        m = quantization_multiplier(row)
        m_x86 = np.float32(np.float32(1) / np.float32(np.float32(1) / m))
        x0 = np.float32(21.5 / m)
        for x in (np.float32(x0 + d * np.spacing(x0)) for d in range(-4, 5)):
            if x * m_x86 == np.float32(21.5) and x * m < np.float32(21.5):
                row[2] = x
                return torch.from_numpy(row)
    raise AssertionError("no such row in the range searched")


def test_quantizer_disagreements_match_exact_rounding():
    """The channels where XNNPACK's x86 quantizer (x · 1/(1/m), ties to even) and KleidiAI's (x · m, ties away
    from zero) give different integers, against both roundings done in exact arithmetic."""
    from runner.arm64_operators import quantizer_disagreements

    rows = torch.randn(6, 96, generator=torch.Generator().manual_seed(0)) * 3
    for r in range(0, 6, 2):  # ties planted on even rows: x·m exactly k + 1/2, positive and negative
        m = quantization_multiplier(rows[r].numpy())
        for channel, half in ((5, np.float32(20.5)), (40, np.float32(-33.5))):
            x = next(np.float32((half + step) / m) for step in np.arange(0, 40, dtype=np.float32) if np.float32((half + step) / m) * m == half + step)
            rows[r, channel] = float(x)
    rows = torch.cat([rows, row_where_the_multipliers_differ(96)[None]])
    expected = []
    for row in rows.numpy():
        m = quantization_multiplier(row)
        m_x86 = np.float32(np.float32(1) / np.float32(np.float32(1) / m))
        expected.append([c for c, x in enumerate(row) if exact_rounding(float(x), float(m_x86), True) != exact_rounding(float(x), float(m), False)])
    found = quantizer_disagreements(rows)
    assert found == expected
    assert all(found[r] for r in range(0, 6, 2)) and not any(found[r] for r in range(1, 6, 2)) and found[6]


class OurKernels(torch.nn.Module):
    """Each of our ExecuTorch kernels once, on inputs with positions past 0 (RoPE turns them) and an int8 cache."""

    def forward(self, x, gain, q, k, v, cos, sin, gate_up, wide):
        ops = torch.ops.spinquant
        q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        k8, v8 = ops.quantize_kv_rows(k), ops.quantize_kv_rows(v)
        return (ops.rms_norm(x, gain, 1e-5), q, k8, v8, ops.silu_mul(gate_up), ops.hadamard_transform(wide),
                ops.attend_kv_cache(q, k8, v8, 0, 0.125), ops.attend_kv_cache(q, k, v, 0, 0.125))


def test_our_kernels_give_the_same_bits_on_arm64(arm64_env, tmp_path):
    """No fused multiply-add the source did not write, sums in one order (kernels/cpu/fixed_order.h): x86 and arm64
    agree bit for bit, so an int8 rounding downstream cannot tell them apart."""
    from executorch.exir import EdgeCompileConfig, to_edge

    import kernels  # noqa: F401  (torch.ops.spinquant)
    from runner.arm64_execute import execute, execute_on_arm64

    torch.manual_seed(0)
    tokens, angles = 8, torch.arange(8.0)[:, None] * (1.0 / 10000 ** (torch.arange(0, 64, 2) / 64))[None]
    turn = torch.cat([angles, angles], -1)[None, :, None]
    args = (torch.randn(1, tokens, 576) * 3, torch.rand(576) + 0.5, torch.randn(1, tokens, 9, 64) * 2, torch.randn(1, tokens, 3, 64) * 2,
            torch.randn(1, tokens, 3, 64), turn.cos(), turn.sin(), torch.randn(1, tokens, 2 * 1536) * 2, torch.randn(tokens, 14336))
    program = to_edge(torch.export.export(OurKernels(), args), compile_config=EdgeCompileConfig(_check_ir_validity=False))
    (tmp_path / "ops.pte").write_bytes(program.to_executorch().buffer)
    x86, arm64 = execute(tmp_path / "ops.pte", args), execute_on_arm64(arm64_env, tmp_path / "ops.pte", args)
    names = ("rms_norm", "rope", "quantize_kv_rows k", "quantize_kv_rows v", "silu_mul", "hadamard_transform",
             "attend_kv_cache int8", "attend_kv_cache float")
    assert [name for name, a, b in zip(names, x86, arm64) if not torch.equal(a, b)] == []
