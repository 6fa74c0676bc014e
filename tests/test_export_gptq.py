from pathlib import Path

import pytest
import torch

from export.options import ExportOptions
from export.program import with_static_cache
from export.to_pte import run
from runner.pte import PteProgram
from spinquant.errors import UserError
from spinquant.gptq import GPTQConfig, GPTQResult
from spinquant.gptq_compact import PACKAGED, save_compact
from spinquant.models import load_model
from spinquant.pipeline import prepare
from spinquant.quant import setting


@pytest.fixture(scope="module")
def gptq_file(tiny_hf_dir, tmp_path_factory):
    """GPTQ of the tiny model under R4 on 4 windows of 64 tokens, its 4-bit lm_head too, saved as `spinquant.eval --gptq-output` does."""
    loaded = load_model(str(tiny_hf_dir))
    cfg = GPTQConfig(group=32, windows=4, seqlen=64)
    model = prepare(loaded.model, "r4", setting("w4a8", lm_head_bits=4, lm_head_group=32), cfg, tokenizer=loaded.tokenizer,
                    calib_text=tiny_hf_dir.parent / "text.txt")
    path = tmp_path_factory.mktemp("gptq") / "gptq.pt"
    model.spinquant.gptq.save(path)
    return path


@pytest.fixture(scope="module")
def compact_gptq_file(tiny_hf_dir, gptq_file):
    """The same result saved compactly, against the float model rotated as GPTQ saw it."""
    rotated = prepare(load_model(str(tiny_hf_dir)).model, "r4", setting("fp"))
    save_compact(GPTQResult.load(gptq_file), rotated, gptq_file.with_suffix(".gptq"))
    return gptq_file.with_suffix(".gptq")


def eager_8da4w(model_dir, opts: ExportOptions, gptq: GPTQResult | None):
    model = load_model(str(model_dir)).model.requires_grad_(False)
    return prepare(model, opts.rotation, opts.program_quant(), gptq, seed=opts.seed)


@pytest.mark.parametrize("form", ["plain", "compact"])
def test_program_holds_gptq_integers_and_matches_eager(tiny_hf_dir, gptq_file, compact_gptq_file, form, tmp_path):
    given = gptq_file if form == "plain" else compact_gptq_file
    opts = ExportOptions(model=str(tiny_hf_dir), rotation="r4", gptq_file=str(given), lm_head="8da4w", max_seq_len=32, output_dir=tmp_path).check()
    report = run(opts)  # its own check compares the program with the eager GPTQ model
    result = GPTQResult.load(gptq_file)
    assert report["gptq"]["calibration_sha256"] == result.calibration_sha256 and "lm_head" in result.weights
    gptq_eager, rtn_eager = eager_8da4w(tiny_hf_dir, opts, result), eager_8da4w(tiny_hf_dir, opts, None)
    differ = 0
    for name, qw in result.weights.items():
        ours, torchao_rtn = gptq_eager.get_submodule(name).weight, rtn_eager.get_submodule(name).weight
        assert torch.equal(ours.qdata, qw.qdata) and torch.equal(ours.scale, qw.scale) and not ours.zero_point.any()
        differ += not torch.equal(torchao_rtn.qdata, qw.qdata)
    assert differ == len(result.weights)  # torchao alone would have rounded every linear differently
    program = PteProgram(tmp_path / "model.pte")
    ids, pos = torch.tensor([[5, 17, 33, 2, 60, 7, 11]]), torch.arange(7)
    with torch.no_grad():
        ours = program.forward(ids, pos)
        gptq_logits = with_static_cache(gptq_eager, 32)(input_ids=ids, cache_position=pos)
        rtn_logits = with_static_cache(rtn_eager, 32)(input_ids=ids, cache_position=pos)
    assert (ours - gptq_logits[:, -1:]).abs().max() < 1e-3
    assert (ours - rtn_logits[:, -1:]).abs().max() > 1e-2  # the check above could tell RTN weights apart


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(rotation="hadamard"), "made under rotation r4, the export uses hadamard:seed0"),
        (dict(group_size=64), "made with group size 32, the export uses --group-size 64"),
        (dict(lm_head="8da8w"), "was made with a GPTQ lm_head; this quantization's lm_head is an 8-bit one"),
    ],
)
def test_a_gptq_file_from_another_setup_is_refused(tiny_hf_dir, gptq_file, tmp_path, overrides, message):
    opts = ExportOptions(model=str(tiny_hf_dir), gptq_file=str(gptq_file), max_seq_len=32, output_dir=tmp_path, **{"lm_head": "8da4w", **overrides})
    with pytest.raises(UserError, match=message):
        run(opts.check())


def test_gptq_is_the_default_for_int4_linears_the_packaged_result_where_it_fits():
    opts = ExportOptions().check()
    assert opts.lm_head == "8da8w" and not opts.gptq and Path(opts.gptq_file) == PACKAGED["smollm2-135m"]
    for unfit in (dict(lm_head="8da4w"), dict(rotation="r4"), dict(group_size=64), dict(gptq=True)):
        opts = ExportOptions(**unfit).check()
        assert opts.gptq and not opts.gptq_file  # GPTQ now, on this CPU
    assert not ExportOptions(qlinear="8da8w").check().gptq and not ExportOptions(gptq_file="g.pt").check().gptq
    assert not ExportOptions(gptq=False).check().gptq_request()
    request = ExportOptions(rotation="r4", max_seq_len=512).check().gptq_request()
    assert (request.windows, request.seqlen) == (8, 512)  # windows no longer than the program's context


def test_gptq_options_are_checked_before_loading():
    with pytest.raises(UserError, match=r"use --qlinear 8da4w \(or e8p2, e8p4\), not 8da8w"):
        ExportOptions(gptq=True, qlinear="8da8w").check()
    with pytest.raises(UserError, match="not both"):
        ExportOptions(gptq=True, gptq_file="g.pt").check()
