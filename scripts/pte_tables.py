"""What the tables that measure a .pte share: its export in a fresh process, and their resumable results file.

No ExecuTorch runtime is imported here: kv_cache_table.py's fake-quantization part runs on a GPU machine without it.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from spinquant.data import text_sha256


def full_logits_export(out: Path, *flags: str) -> tuple[dict, float]:
    """`python -m export.to_pte --full-logits` with `flags` into `out`, in a fresh process (its report measures the
    export alone), so that the program gives every position's logits for perplexity: the report and the wall seconds."""
    start = time.time()
    subprocess.run([sys.executable, "-m", "export.to_pte", *flags, "--full-logits", "--output-dir", str(out)], check=True)
    return json.loads((out / "export_report.json").read_text()), time.time() - start


def resumed_results(json_path: Path, text_path: Path, text: str, max_windows: int) -> dict:
    """The table's results so far (rows measured in an earlier run are kept), with the evaluation text it measures on."""
    results = json.loads(json_path.read_text()) if json_path.exists() else {"rows": {}}
    results.update(text=os.path.relpath(text_path), text_sha256=text_sha256(text), max_windows=max_windows)
    return results
