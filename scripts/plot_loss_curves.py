"""`python scripts/plot_loss_curves.py OUT.png "TITLE" LABEL=CSV [LABEL=CSV ...]`: loss curves side by side.

Each CSV has a header; its first column is the step (or iteration), and it has a `loss` column: what
`python -m spinquant.optimize` writes beside a rotation (.loss.csv) and `benchmarks/optimize_speed.py --losses` writes.
"""

import csv
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spinquant.files import write_atomic  # noqa: E402


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    first = next(iter(rows[0]))
    return [int(r[first]) for r in rows], [float(r["loss"]) for r in rows]


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit(__doc__.splitlines()[0])
    out, title, curves = Path(argv[0]), argv[1], [pair.partition("=")[::2] for pair in argv[2:]]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, path in curves:
        ax.plot(*read_curve(Path(path)), label=label, linewidth=1.2)
    ax.set(xlabel="step", ylabel="fake-quantized cross-entropy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    write_atomic(out, buf.getvalue())
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
