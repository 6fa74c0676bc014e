"""A GPTQ result in about one bit per weight, so that the demo's can ship in the package (spinquant/rotations/).

A saved GPTQ result holds a byte per int4 weight. But GPTQ's integer is round to nearest's under the same scale for
about four weights in five, and off by one for nearly all the rest (the demo's GPTQ at the export's calibration:
80.2% the same, 19.7% off by one). So this file holds each weight's difference from round to nearest of the rotated
float weight, and the reader recomputes round to nearest from the rotated model it puts the integers into: the file is
only readable against that model. The differences are split by where the weight fell between two integers (one near
a half goes the other way far more often) and each part is lzma-compressed: there, 0.72 bits of entropy per weight
split against 0.93 unsplit; the packaged file's differences take 0.69 bits a weight.
Scales are kept as they are (bf16 bits, lzma). A sha256 of the integers says whether this machine's rotation gave
back exactly the writer's; a float rounding that differs on some other machine moves a few integers by one.
"""

import dataclasses
import hashlib
import io
import lzma
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spinquant.errors import UserError
from spinquant.files import write_atomic
from spinquant.gptq import GPTQ_REMEDY, SCALE_DTYPES, GPTQConfig, GPTQResult, QuantizedWeight, gptq_linears, misfit, quantize_with_scale, rotation_id
from spinquant.quant import _qrange
from spinquant.torch_files import load_torch_file

FORMAT = "spinquant-gptq-compact-1"
# GPTQ results that ship, by model: made with scripts/package_gptq.py on a GPU (GPTQ on all of calib.txt, then scale tuning).
PACKAGED = {"smollm2-135m": Path(__file__).resolve().parent / "rotations" / "smollm2_w4a8.gptq"}
FRACTION_PARTS = 16  # parts of [-½, ½) that split the differences; one more for weights clamped to the integer range


@dataclass
class CompactGPTQ:
    """A compact file as read: `result` has its scales and record, and placeholder integers until decoded(model)."""

    result: GPTQResult
    deltas: list[bytes]  # lzma streams, one per part
    integers_sha256: str

    def decoded(self, model: nn.Module, source: str) -> GPTQResult:
        """The integers, from the rotated float `model` (the one they go into) and the stored differences."""
        linears = gptq_linears(model, lm_head=True)
        for name, qw in self.result.weights.items():
            if name not in linears or tuple(linears[name].weight.shape) != tuple(qw.qdata.shape):
                raise misfit(source, f"holds {tuple(qw.qdata.shape)} integers for {name}, which this model's weights do not match")
        names = sorted(self.result.weights)
        bits = self.result.config.bits
        nearest, parts = {}, []
        for name in names:
            nearest[name], x = rounded(linears[name].weight, self.result.weights[name].scale, bits)
            parts.append(fraction_part(x, bits))
        parts = np.concatenate(parts)
        if len(self.deltas) != FRACTION_PARTS + 1:
            raise UserError(f"the GPTQ file {source} holds {len(self.deltas)} parts of differences, not {FRACTION_PARTS + 1}: corrupt; {GPTQ_REMEDY}")
        delta = np.empty(len(parts), dtype=np.int8)
        for part, stream in enumerate(self.deltas):
            where = parts == part
            values = np.frombuffer(lzma.decompress(stream), dtype=np.int8)
            if len(values) != where.sum():
                raise UserError(f"the GPTQ file {source} holds {len(values)} differences for {where.sum()} weights: corrupt; {GPTQ_REMEDY}")
            delta[where] = values
        weights, start, digest = {}, 0, hashlib.sha256()
        qmin, qmax = _qrange(bits)
        for name in names:
            q = nearest.pop(name)
            q = (q + torch.from_numpy(delta[start : start + q.numel()]).view(q.shape)).clamp_(qmin, qmax)
            start += q.numel()
            digest.update(q.numpy().tobytes())
            weights[name] = QuantizedWeight(q, self.result.weights[name].scale)
        if digest.hexdigest() != self.integers_sha256:
            print(f"GPTQ file {source}: this machine's rotated weights round a few of its integers differently from the machine "
                  "that wrote it (its integers' sha256 differs); each such integer is off by one", file=sys.stderr)
        return dataclasses.replace(self.result, weights=weights)


def rounded(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest's int8 integers of `weight` under `scale` (torchao's arithmetic, as GPTQ's), and the unrounded values."""
    w = weight.detach().float().cpu()
    s = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
    return quantize_with_scale(w, s, bits).to(torch.int8), w * (1.0 / s)


def fraction_part(x: torch.Tensor, bits: int) -> np.ndarray:
    """Which part of the splitting each weight's difference goes to: its place between two integers, or the clamped part."""
    qmin, qmax = _qrange(bits)
    frac = x - torch.round(x)
    part = ((frac + 0.5) * FRACTION_PARTS).floor().clamp_(0, FRACTION_PARTS - 1).to(torch.uint8)
    part[(x < qmin - 0.5) | (x > qmax + 0.5)] = FRACTION_PARTS
    return part.flatten().numpy()


def save_compact(result: GPTQResult, model: nn.Module, path: Path) -> None:
    """Write `result` compactly against `model`, the rotated float model GPTQ ran on (before its weights were replaced)."""
    if result.config.codebook != "int":
        raise UserError("a compact GPTQ file holds int weights; E8P codes are already 2 bits a weight: save them as they are")
    linears = gptq_linears(model, lm_head=True)
    names = sorted(result.weights)
    parts, deltas, digest = [], [], hashlib.sha256()
    for name in names:
        qw = result.weights[name]
        q, x = rounded(linears[name].weight, qw.scale, result.config.bits)
        parts.append(fraction_part(x, result.config.bits))
        deltas.append((qw.qdata.to(torch.int8) - q).flatten().numpy())
        digest.update(qw.qdata.to(torch.int8).numpy().tobytes())
    parts, deltas = np.concatenate(parts), np.concatenate(deltas)
    chunks = [deltas[parts == part].tobytes() for part in range(FRACTION_PARTS + 1)]
    with ThreadPoolExecutor() as pool:  # lzma lets go of the GIL: one core per part
        streams = list(pool.map(lambda c: lzma.compress(c, preset=9), chunks))
    scales = torch.cat([result.weights[n].scale.contiguous().view(torch.int16).flatten() for n in names]).numpy().tobytes()
    state = {**result.describe(), "format": FORMAT, "shapes": {n: list(result.weights[n].qdata.shape) for n in names},
             "scales": as_bytes_tensor(lzma.compress(scales, preset=9)), "deltas": [as_bytes_tensor(s) for s in streams],
             "integers_sha256": digest.hexdigest()}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def as_bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def is_compact(state: object) -> bool:
    return isinstance(state, dict) and state.get("format") == FORMAT


def load_gptq_file(path: Path) -> GPTQResult | CompactGPTQ:
    """A saved GPTQ result, plain or compact (whose integers come with CompactGPTQ.decoded, once the model is rotated)."""
    state = load_torch_file(Path(path), "GPTQ file", GPTQ_REMEDY)
    if not is_compact(state):
        return GPTQResult.from_state(state, path)
    try:
        return compact_from_state(state)
    except (KeyError, TypeError, ValueError, AttributeError, lzma.LZMAError) as e:
        raise UserError(f"compact GPTQ file {path} is corrupt ({type(e).__name__}: {e}); {GPTQ_REMEDY}") from None


def compact_from_state(state: dict) -> CompactGPTQ:
    """A loaded compact file's contents (is_compact(state)); its integers are placeholders until CompactGPTQ.decoded."""
    config = GPTQConfig(**state["config"])
    dtype = SCALE_DTYPES[config.scale_dtype]
    scales = torch.from_numpy(np.frombuffer(lzma.decompress(state["scales"].numpy().tobytes()), dtype=np.int16).copy()).view(dtype)
    placeholder = torch.zeros((), dtype=torch.int8)
    weights, start = {}, 0
    for name, (out, inputs) in sorted(state["shapes"].items()):
        count = out * (inputs // (config.group or inputs))
        weights[name] = QuantizedWeight(placeholder.expand(out, inputs), scales[start : start + count].view(out, -1))
        start += count
    info = {f.name: state[f.name] for f in dataclasses.fields(GPTQResult) if f.name not in ("weights", "config")}
    return CompactGPTQ(GPTQResult(weights=weights, config=config, **info), [d.numpy().tobytes() for d in state["deltas"]], state["integers_sha256"])


def packaged_gptq(model: str, rotation: str, group: int, lm_head: bool) -> str:
    """The packaged GPTQ result's file when it fits an export of `model` under `rotation` in groups of `group`, with (`lm_head`)
    or without an int4 lm_head by GPTQ; else ""."""
    path = PACKAGED.get(model)
    if path is None or not path.is_file():
        return ""
    state = load_torch_file(path, "GPTQ file", GPTQ_REMEDY)  # its record alone: every export options' check reads it
    fits = state["rotation"] == rotation_id(rotation, 0) and state["config"]["group"] == group and ("lm_head" in state["shapes"]) == lm_head
    return str(path) if fits else ""
