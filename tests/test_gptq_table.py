"""scripts/gptq_table.py's Markdown from a results json: held-out windows and the programs of several GPTQ methods."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from gptq_table import markdown, pte_parts  # noqa: E402


def results(**extra) -> dict:
    cells = {"fp": {"fp": 20.0}, "r/gptq-clip": {"w4a16": 20.5, "w4a8": 20.8}, "r/gptaq-clip-a8": {"w4a16": 20.4, "w4a8": 20.6}}
    return dict(rows=cells, rotations=["r"], methods=["gptq-clip", "gptaq-clip-a8"], learned={"r": "r.pt"}, max_windows=16,
                seqlen=2048, text="eval.txt", text_sha256="0" * 64, device_name="GPU", environment="env", command="cmd", jobs=1, **extra)


def program(method: str, ppl: float) -> dict:
    return dict(method=method, command=f"pte {method}", environment="cpu", rtn={}, rtn_source="none",
                rows={"r": dict(pte_perplexity=ppl, export_seconds=1.0)})


def test_held_out_windows_are_named_and_no_program_section_without_programs():
    md = markdown(results(first_window=16))
    assert "windows 16–31 (0-based; the first 16 left out)" in md
    assert "The exported programs" not in md
    assert "RTN not measured" in md  # no RTN cells: no comparison against them
    assert "Best fake-quant W4A8: r with `gptaq-clip-a8`, 20.60, +3.0%" in md
    assert "the first 16 windows" in markdown(results())


def test_programs_of_every_method_are_shown_and_the_best_is_found():
    one = results(pte=program("gptq-clip", 21.0))  # the json's earlier layout: one method's part
    assert list(pte_parts(one)) == ["gptq-clip"]
    md = markdown(results(pte={"gptq-clip": program("gptq-clip", 21.0), "gptaq-clip-a8": program("gptaq-clip-a8", 20.9)}))
    assert "### `gptq-clip`" in md and "### `gptaq-clip-a8`" in md
    assert "Command: `pte gptaq-clip-a8`" in md
    assert "Best .pte: r with `gptaq-clip-a8`, 20.90, +4.5% from full precision (bar 21.00): met." in md


def test_a_table_of_round_to_nearest_alone_renders_without_a_best_gptq():
    rtn_only = dict(results(), rows={"fp": {"fp": 20.0}, "r/rtn-bf16": {"w4a16": 22.0, "w4a8": 22.4}}, methods=["rtn-bf16"])
    md = markdown(rtn_only)
    assert "| r | 22.40 |" in md and "Best fake-quant" not in md
