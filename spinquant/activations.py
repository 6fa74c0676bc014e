"""`python -m spinquant.activations`: why rotating works, as a picture.

Per-channel max |activation| over a text's tokens, at down_proj's input (what its int8 activation
quantization sees: after the online Hadamard when R4 is on) and in the residual stream entering a
decoder layer, for the model as it is and rotated. A channel far above the rest is an outlier that
sets every token's int8 scale; a rotation spreads it over all channels.
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

from spinquant.data import evaluation_text, read_text, token_windows
from spinquant.errors import UserError, one_line_errors
from spinquant.models import load_model
from spinquant.pipeline import prepare
from spinquant.quiet import add_verbose_flag
from spinquant.rotation import default_rotation, quantized_input_linear

SITES = ("residual stream into the layer", "down_proj input")


@torch.no_grad()
def channel_max(model, ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer and site, the max |x| of each channel over every token."""
    found: list[dict[str, torch.Tensor]] = [{} for _ in model.model.layers]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for site, module in zip(SITES, (layer, quantized_input_linear(layer.mlp.down_proj))):
            def record(mod, args, i=i, site=site):
                found[i][site] = args[0].abs().flatten(0, -2).amax(0).float()
            hooks.append(module.register_forward_pre_hook(record))
    try:
        model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return found


def outlier_ratio(channel_max_values: torch.Tensor) -> float:
    return float(channel_max_values.max() / channel_max_values.median())


def plot(before: dict, after: dict, layer: int, rotation: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 6), sharey="row")
    for row, site in enumerate(SITES):
        for col, (name, values) in enumerate((("no rotation", before[site]), (f"rotation {rotation}", after[site]))):
            ax = axes[row][col]
            ax.plot(values.numpy(), linewidth=0.6)
            ax.set_yscale("log")
            ax.set_title(f"{site}, {name}: max/median {outlier_ratio(values):.0f}×", fontsize=9)
            ax.set_xlabel("channel")
        axes[row][0].set_ylabel("max |activation|")
    fig.suptitle(f"Layer {layer}: per-channel max |activation| over the text's tokens")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spinquant.activations", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rotation", help="as export.to_pte (default: its default for the model)")
    p.add_argument("--layer", type=int, help="default: the layer whose down_proj input has the largest outlier")
    p.add_argument("--text", type=Path, default=evaluation_text())
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--output", type=Path, default=Path("results/activations.png"))
    add_verbose_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    loaded = load_model(args.model)
    model = loaded.model.requires_grad_(False)
    rotation = args.rotation or default_rotation(args.model)
    rotated = prepare(copy.deepcopy(model), rotation)
    ids = token_windows(loaded.tokenizer, read_text(args.text), args.seqlen, 1)
    before, after = channel_max(model, ids), channel_max(rotated, ids)
    ratios = [outlier_ratio(b[SITES[1]]) for b in before]
    layer = args.layer if args.layer is not None else max(range(len(ratios)), key=ratios.__getitem__)
    if not 0 <= layer < len(before):
        raise UserError(f"--layer {layer}: the model has layers 0 to {len(before) - 1}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    plot(before[layer], after[layer], layer, Path(rotation).stem, args.output)
    summary = {site: (outlier_ratio(before[layer][site]), outlier_ratio(after[layer][site])) for site in SITES}
    for site, (b, a) in summary.items():
        print(f"layer {layer}, {site}: max/median {b:.0f}× without rotation, {a:.0f}× with {rotation}")
    print(f"wrote {args.output}")
    return dict(layer=layer, ratios=summary)


if __name__ == "__main__":
    with one_line_errors("spinquant.activations"):
        main(sys.argv[1:])
