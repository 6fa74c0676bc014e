"""The .pte columns of results/gptq_smollm2.md: each rotation's GPTQ weights exported, then the program run.

    python scripts/gptq_pte_table.py --gptq-dir out/gptq --method gptaq-clip-a8 --rotations learned

The GPTQ files are those `scripts/gptq_table.py --save-gptq DIR` wrote (ROTATION_METHOD.pt, made on
the GPU); each is exported by `python -m export.to_pte --gptq-file` in a fresh process, so the
program holds its integers and bf16 scales bit for bit, with the export's 8-bit embedding and 8da8w
lm_head. The program's perplexity is computed by running it as scripts/export_table.py does (chunked
prefill) on the table's windows. The RTN programs' perplexities are read from results/export_smollm2.json
(the same export without --gptq-file, measured on this CPU; `--rtn-from REV` reads it as committed at
REV), not re-measured. Adds the method's part to the `pte` parts of results/gptq_smollm2.json (one per
GPTQ method; resumable: rotations already there are kept) and regenerates the Markdown.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from gptq_table import markdown, pte_parts
from pte_tables import full_logits_export
from transformers import AutoTokenizer

from runner.pte import PteProgram
from spinquant.data import read_text, text_sha256, token_windows
from spinquant.environment import environment_line
from spinquant.errors import UserError
from spinquant.files import write_atomic, write_json_atomic
from spinquant.metrics import perplexity_of

RESULTS = Path(__file__).resolve().parents[1] / "results"
# results/export_smollm2.json's rows by this table's rotation names (its `learned` is smollm2_w4a8.pt).
EXPORT_TABLE_ROWS = {"none": "none", "hadamard": "hadamard", "learned": "learned"}


def measure(results: dict, rotation: str, args: argparse.Namespace) -> dict:
    spec = {"none": "none", "hadamard": "hadamard", **results["learned"]}[rotation]
    gptq_file = args.gptq_dir / f"{rotation}_{args.method}.pt"
    out = args.work_dir / args.method / rotation
    report, wall = full_logits_export(out, "--model", results.get("model", "smollm2-135m"), "--rotation", spec, "--gptq-file", str(gptq_file))
    program = PteProgram(out / "model.pte")
    text = read_text(Path(results["text"]))
    if text_sha256(text) != results["text_sha256"]:
        raise UserError(f"{results['text']} is not the text the fake-quant table was measured on (sha256 differs)")
    windows = token_windows(AutoTokenizer.from_pretrained(out), text, results["seqlen"], results["max_windows"], results.get("first_window", 0))
    start = time.time()
    ppl = perplexity_of(program.prefill_logits, windows)
    return dict(
        gptq_file=str(gptq_file), rotation=spec, pte_perplexity=ppl, perplexity_seconds=round(time.time() - start, 1),
        export_seconds=report["export_seconds"], wall_seconds=round(wall, 1), verify=report["verify"],
        pte_bytes=report["pte_bytes"],
    )


def rtn_from_export_table(revision: str) -> tuple[dict[str, float], str]:
    """The RTN programs' perplexities from results/export_smollm2.json as committed at `revision` (or the file as it is: "")."""
    if revision:
        text = subprocess.run(["git", "show", f"{revision}:results/export_smollm2.json"], check=True, capture_output=True, text=True).stdout
    else:
        path = RESULTS / "export_smollm2.json"
        text = path.read_text() if path.is_file() else '{"rows": {}}'
    rows = json.loads(text)["rows"]
    found = {ours: rows[theirs]["pte_perplexity"] for ours, theirs in EXPORT_TABLE_ROWS.items() if theirs in rows}
    where = f"results/export_smollm2.json at commit {revision}" if revision else "results/export_smollm2.json"
    return found, f"{where} (scripts/export_table.py, the same export without --gptq-file, this CPU)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gptq-dir", type=Path, required=True, help="the folder of scripts/gptq_table.py --save-gptq")
    p.add_argument("--method", default="gptq-act-order-clip", help="which GPTQ method's files to export")
    p.add_argument("--rotations", nargs="+", help="default: every rotation of the table")
    p.add_argument("--rtn-from", default="", help="git revision of results/export_smollm2.json to read the RTN .pte rows from (default: the file)")
    p.add_argument("--work-dir", type=Path, default=Path("out/gptq_pte"))
    p.add_argument("--output", type=Path, default=Path("results/gptq_smollm2"))
    args = p.parse_args()
    json_path = args.output.with_suffix(".json")
    results = json.loads(json_path.read_text())
    if results.get("first_window", 0) == 0:
        rtn, source = rtn_from_export_table(args.rtn_from)
    else:  # the export table's RTN programs were run on the first windows, not these
        rtn, source = {}, "not measured on these windows (results/export_smollm2.json ran the first ones)"
    parts = pte_parts(results)
    pte = parts.setdefault(args.method, {"method": args.method, "rows": {}})
    pte.update(rtn=rtn, rtn_source=source, environment=environment_line(),
               command=("python scripts/gptq_pte_table.py " + " ".join(sys.argv[1:])).strip())
    results["pte"] = parts
    for rotation in args.rotations or results["rotations"]:
        if rotation not in pte["rows"]:
            pte["rows"][rotation] = measure(results, rotation, args)
            print(f"{rotation}: .pte perplexity {pte['rows'][rotation]['pte_perplexity']:.3f}", file=sys.stderr, flush=True)
            write_json_atomic(json_path, results)
        write_atomic(args.output.with_suffix(".md"), markdown(results).encode())
    write_json_atomic(json_path, results)
    write_atomic(args.output.with_suffix(".md"), markdown(results).encode())


if __name__ == "__main__":
    main()
