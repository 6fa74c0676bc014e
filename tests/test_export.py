import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from executorch.exir._serialize._program import deserialize_pte_binary
from executorch.exir.schema import KernelCall

from export.options import ExportOptions
from export.exportable_llama import ExportableLlama
from export.program import delegate_linears, emit_program, export_program, memory_plan_parts, planned_memory_bytes, with_static_cache
from export.to_pte import main, parse_args, run
from export.verify import check_agreement, compare_with_reference, eager_reference
from runner.pte import PteProgram
from spinquant.errors import UserError
from spinquant.metrics import kl_per_position
from spinquant.models import load_model, tiny_llama, tiny_llama_config
from spinquant.pipeline import prepare
from spinquant.rotation import LEARNED_ROTATIONS


def eager_quantized(opts: ExportOptions):
    """The export's eager model, its GPTQ (the default) included: deterministic on the CPU, so the same integers."""
    loaded = load_model(opts.model)
    return prepare(loaded.model.requires_grad_(False), opts.rotation, opts.program_quant(), opts.gptq_request(), tokenizer=loaded.tokenizer,
                   calib_text=opts.calib_text, seed=opts.seed)


def assert_program_matches_eager(opts: ExportOptions, steps: int = 8, tol: float = 1e-3):
    program = PteProgram(opts.output_dir / "model.pte")
    eager = with_static_cache(eager_quantized(opts), opts.max_seq_len)
    ids, pos = torch.tensor([[5, 17, 33, 2, 60, 7, 11]]), torch.arange(7)
    with torch.no_grad():
        for _ in range(steps + 1):  # prefill, then decode steps
            ours, ref = program.forward(ids, pos), eager(input_ids=ids, cache_position=pos)
            expected = ref if opts.full_logits else ref[:, -1:]
            assert ours.shape == expected.shape
            assert (ours - expected).abs().max() < tol
            ids, pos = ref[:, -1:].argmax(-1), pos[-1:] + 1


@pytest.fixture(scope="module")
def default_export(tiny_hf_dir, tmp_path_factory):
    opts = ExportOptions(model=str(tiny_hf_dir), max_seq_len=64, output_dir=tmp_path_factory.mktemp("pte"))
    return opts, run(opts.check())


def test_default_export_matches_eager_and_reports(default_export):
    opts, report = default_export
    assert_program_matches_eager(opts)
    files = sorted(p.name for p in opts.output_dir.iterdir())
    assert files == ["export_report.json", "model.pte", "tokenizer.json", "tokenizer_config.json"]
    saved = json.loads((opts.output_dir / "export_report.json").read_text())
    assert saved["options"]["qlinear"] == "8da4w" and saved["rotation"]["r4_online_hadamard"]
    assert saved["pte_bytes"] == (opts.output_dir / "model.pte").stat().st_size
    assert sum(saved["memory_plan_parts"].values()) == saved["planned_memory_bytes"]["forward"]
    assert saved["verify"]["top1_agreement"] == 1.0 and saved["verify"]["max_abs_logit_diff"] < 1e-3
    assert saved["verify"]["mean_kl"] < 1e-6 and saved["verify"]["positions"] == 9  # the prompt's last position + 8 decode steps
    assert {"torch", "executorch", "torchao"} <= set(saved["environment"])


def test_check_fails_on_a_program_that_is_not_the_model(default_export, tiny_hf_dir):
    opts, _ = default_export
    other = eager_quantized(opts)
    other.model.norm.weight.data *= 4  # a different model: every logit scaled
    agreement = compare_with_reference(opts.output_dir / "model.pte", eager_reference(other, [5, 17, 33, 2, 60, 7], opts.max_seq_len, opts.prefill_chunk))
    assert agreement.mean_kl > 0.1
    with pytest.raises(UserError, match="diverges from the eager quantized model: mean KL"):
        check_agreement(agreement)


def test_kl_per_position_matches_its_definition():
    p, q = torch.tensor([[0.1, 0.2, 0.7]], dtype=torch.float64), torch.tensor([[0.3, 0.3, 0.4]], dtype=torch.float64)
    expected = (p * (p / q).log()).sum()
    assert torch.allclose(kl_per_position(p.log() + 3.0, q.log() - 1.0), expected.view(1), atol=1e-12)
    assert kl_per_position(p.log(), p.log()).abs().max() < 1e-12


def test_metadata_reads_back(default_export, tiny_hf_dir):
    opts, _ = default_export
    meta = PteProgram(opts.output_dir / "model.pte").metadata()
    tok = load_model(str(tiny_hf_dir)).tokenizer
    assert meta["get_max_context_len"] == 64 and meta["get_max_seq_len"] == 63 and meta["get_n_layers"] == 2  # calls: a 256 chunk, cut to the cache
    assert meta["get_vocab_size"] == len(tok) and meta["get_bos_id"] == tok.bos_token_id
    assert tok.eos_token_id in meta["get_eos_ids"]
    assert meta["use_kv_cache"] and meta["enable_dynamic_shape"]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(rotation="orthogonal", qlinear="8da8w", qembedding="none", lm_head="8da8w", group_size=64),
        dict(rotation="none", qlinear="none", qembedding="4w", lm_head="8da4w", group_size=32),
    ],
    ids=["orthogonal-8da8w", "none-float-emb4w-lmhead8da4w"],
)
def test_other_supported_options_export_and_match(tiny_hf_dir, tmp_path, overrides):
    """A float32 cache: with quantized linears, XNNPACK's and torchao's last bits can move an int8 key at a rounding
    tie (test_an_int8_kv_cache_computes_its_fake_quantization checks the int8 cache to float rounding)."""
    opts = ExportOptions(model=str(tiny_hf_dir), max_seq_len=32, output_dir=tmp_path, verify=False, kv_cache="fp32", **overrides)
    run(opts.check())
    assert_program_matches_eager(opts, steps=2)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--qlinear", "4w"], "--qlinear 4w: ExecuTorch 1.5.1 cannot run torchao's weight-only linears"),
        (["--lm-head", "8w"], "--lm-head 8w: ExecuTorch 1.5.1 cannot run"),
        (["--qlinear", "int3"], "--qlinear int3 is not supported"),
        (["--group-size", "48"], "--group-size 48 is not supported"),
        (["--dtype", "fp16"], "--dtype fp16 is not supported"),
        (["--model", "nope-7b"], "unknown model 'nope-7b'"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_model_dependent_refusals_come_before_any_file(tiny_hf_dir, tmp_path):
    base = dict(model=str(tiny_hf_dir), output_dir=tmp_path, max_seq_len=32)
    with pytest.raises(UserError, match="--max-seq-len 512 is above the model's context of 256"):
        run(ExportOptions(**{**base, "max_seq_len": 512}).check())
    with pytest.raises(UserError, match="--group-size 256 does not divide .* 64 inputs"):
        run(ExportOptions(**base, group_size=256).check())
    torch.save({"R1": torch.eye(32)}, tmp_path / "bad.bin")
    with pytest.raises(UserError, match="'R1' is \\(32, 32\\), the model needs \\(64, 64\\)"):
        run(ExportOptions(**base, rotation=str(tmp_path / "bad.bin")).check())
    assert not list(tmp_path.glob("*.pte"))


def test_config_yaml_mirrors_flags_and_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rotation: hadamard\ngroup-size: 64\nmax_seq_len: 128\n")
    opts = parse_args(["--config", str(cfg), "--group-size", "128"])
    assert (opts.rotation, opts.group_size, opts.max_seq_len) == ("hadamard", 128, 128)
    cfg.write_text("rotations: hadamard\n")
    with pytest.raises(UserError, match="unknown option\\(s\\) rotations"):
        parse_args(["--config", str(cfg)])


def test_failed_verification_leaves_nothing_that_looks_valid(tiny_hf_dir, tmp_path, monkeypatch):
    import export.to_pte as to_pte

    (tmp_path / "model.pte").write_bytes(b"stale program from an earlier export")

    def diverged(agreement):
        raise UserError("diverged")

    monkeypatch.setattr(to_pte, "check_agreement", diverged)
    with pytest.raises(UserError, match="diverged"):
        run(ExportOptions(model=str(tiny_hf_dir), max_seq_len=32, output_dir=tmp_path, qlinear="8da8w").check())
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_default_rotation_is_the_learned_one_for_the_demo_model_and_r4_elsewhere(tiny_hf_dir):
    assert ExportOptions().check().rotation == str(LEARNED_ROTATIONS["smollm2-135m"])
    assert LEARNED_ROTATIONS["smollm2-135m"].is_file()
    assert ExportOptions(model=str(tiny_hf_dir)).check().rotation == "r4"
    assert ExportOptions(rotation="none").check().rotation == "none"


def test_saved_tokenizer_keeps_the_chat_template(tiny_hf_dir, tmp_path):
    from transformers import AutoTokenizer

    from export.to_pte import save_tokenizer

    tokenizer = load_model(str(tiny_hf_dir)).tokenizer
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    save_tokenizer(tokenizer, tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded("Robert Boulter")["input_ids"] == tokenizer("Robert Boulter")["input_ids"]


def test_partition_cutting_still_sorts_a_graph_left_out_of_order():
    import executorch.exir.lowered_backend_module as lowered

    from export.program import is_topologically_sorted, legalize_only_out_of_order_graphs

    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
    assert is_topologically_sorted(gm.graph)
    relu, tanh = [n for n in gm.graph.nodes if n.op == "call_module"]
    tanh.append(relu)  # moves relu after its user
    assert not is_topologically_sorted(gm.graph)
    original = lowered.legalize_graph
    with legalize_only_out_of_order_graphs():
        in_order = torch.fx.symbolic_trace(torch.nn.ReLU())
        graph = in_order.graph
        assert lowered.legalize_graph(in_order).graph is graph  # nothing rebuilt
        assert is_topologically_sorted(lowered.legalize_graph(gm).graph)
    assert lowered.legalize_graph is original


def test_a_bf16_checkpoint_exports_the_program_of_its_float32_copy(tiny_hf_dir, tmp_path):
    """Loaded in bf16 and widened a part at a time, it lowers to the bytes of the same values loaded in float32."""
    loaded = load_model(str(tiny_hf_dir))
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        loaded.model.to(dtype).save_pretrained(tmp_path / name)  # bf16 first: the float32 copy holds bf16's values
        loaded.tokenizer.save_pretrained(tmp_path / name)
    reports = {
        name: run(ExportOptions(model=str(tmp_path / name), rotation="hadamard", max_seq_len=64, output_dir=tmp_path / f"out-{name}").check())
        for name in ("bf16", "fp32")
    }
    assert load_model(str(tmp_path / "bf16"), None).model.dtype == torch.bfloat16
    assert (tmp_path / "out-bf16" / "model.pte").read_bytes() == (tmp_path / "out-fp32" / "model.pte").read_bytes()
    assert reports["bf16"]["verify"]["mean_kl"] < 1e-5  # float rounding, over the 9 positions the check sees


def test_the_memory_plan_holds_the_last_logits_only_unless_asked_for_all(tiny_hf_dir, tmp_path):
    """A vocabulary large enough for the logits to dominate the plan, as on real models (demo: 384 MiB of 2,048 × 49,152)."""
    vocab, max_seq_len = 8192, 64
    model = tiny_llama(tiny_llama_config(vocab=vocab), dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_hf_dir).save_pretrained(tmp_path / "model")
    planned = {
        (full, chunk): run(ExportOptions(model=str(tmp_path / "model"), rotation="none", max_seq_len=max_seq_len, full_logits=full,
                                         prefill_chunk=chunk, verify=False, output_dir=tmp_path / f"out-{full}-{chunk}").check())["planned_memory_bytes"]["forward"]
        for full, chunk in ((False, 256), (True, 256), (False, 8))
    }
    logits_of_the_longest_call = (max_seq_len - 1) * vocab * 4  # calls of up to 63 tokens: the chunk is cut to what the cache holds
    assert planned[True, 256] >= logits_of_the_longest_call
    assert planned[False, 256] < logits_of_the_longest_call / 4  # activations and one position's logits
    assert planned[False, 8] < planned[False, 256]  # activations planned for 8 tokens, not 63



def program_operators(pte: Path) -> list[str]:
    """Every kernel call of forward, by operator name (delegated linears are one XNNPACK call each, not listed)."""
    plan = deserialize_pte_binary(pte.read_bytes()).program.execution_plan[0]
    calls = [instruction.instr_args for chain in plan.chains for instruction in chain.instructions]
    return [plan.operators[call.op_index].name for call in calls if isinstance(call, KernelCall)]


@pytest.mark.parametrize("r3", [True, False], ids=["r3", "no-r3"])
def test_an_int8_kv_cache_computes_its_fake_quantization(tiny_hf_dir, tmp_path, r3):
    """The eager model quantizes keys and values as the program's int8 cache does (per token and head, symmetric),
    after R3's Hadamard when it is on: the logits agree to float rounding. Float linears: the
    quantized ones' last-bit differences between XNNPACK and torchao can move an int8 key at a rounding tie
    (0.007 of logits near 1 here), which the export's own check (a KL bound) allows for."""
    opts = ExportOptions(model=str(tiny_hf_dir), rotation="hadamard", qlinear="none", qembedding="none", lm_head="none",
                         max_seq_len=32, kv_cache="int8", r3=r3, output_dir=tmp_path)
    report = run(opts.check())
    assert_program_matches_eager(opts, steps=4, tol=1e-5)
    layers, kv_heads, head_dim = 2, 2, 16
    assert report["memory_plan_parts"]["kv_cache"] == layers * 2 * 32 * kv_heads * (head_dim + 4)  # int8 values, float32 scale
    operators = program_operators(tmp_path / "model.pte")
    assert operators.count("spinquant::attend_kv_cache") == layers and operators.count("spinquant::quantize_kv_rows") == 2 * layers
    assert operators.count("spinquant::hadamard_transform") == layers * (2 if r3 else 1)  # R4 on down_proj, R3 on q and k together


def test_the_memory_plan_splits_into_kv_cache_logits_and_activations():
    """The parts add up to the plan; the KV cache part is the cache buffers' bytes, the logits one position's."""
    model, max_seq_len = tiny_llama(tiny_llama_config(vocab=512), dtype=torch.float32), 64
    manager = emit_program(delegate_linears(export_program(model, max_seq_len, prefill_chunk=256), {}))
    parts = memory_plan_parts(manager)
    caches = [b for name, b in ExportableLlama(model, max_seq_len).named_buffers() if "cache" in name]
    assert sum(parts.values()) == planned_memory_bytes(manager)["forward"]
    assert parts["kv_cache"] == sum(b.nbytes for b in caches) == 2 * 2 * max_seq_len * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, fp32
    assert parts["logits"] == 512 * 4 and parts["activations"] > 0


def test_the_command_line_says_what_it_wrote_and_how_it_checked(tiny_hf_dir, tmp_path, capsys):
    """The check's top-1 agreement as a count of positions: on a short check prompt one near-tie is a large percentage."""
    main(["--model", str(tiny_hf_dir), "--max-seq-len", "32", "--output-dir", str(tmp_path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads((tmp_path / "export_report.json").read_text())["verify"]
    assert line.startswith(f"wrote {tmp_path / 'model.pte'} (")
    assert line.endswith(f"top-1 {round(report['top1_agreement'] * report['positions'])}/{report['positions']} positions")
