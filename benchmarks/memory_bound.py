"""Memory-bandwidth bound on decode speed: the bytes one decoded token reads ÷ the machine's copy bandwidth.

At a batch of one, a decode step reads every weight its forward touches once, and the demo model's
weights (~100 MB) are several times any CPU cache, so they come from DRAM each step; so does the
KV cache up to the step's position. No decoder can go faster than memory delivers those bytes.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from transformers import PretrainedConfig


def copy_bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second moved by `threads` threads each copying its slice of a buffer far larger than
    the caches, counted as STREAM does (bytes read + bytes written); the best of `repeats`, since a
    bound should be the most the machine gives. numpy releases the GIL while it copies."""
    src = np.ones(mib * 2**20, dtype=np.uint8)
    dst = np.zeros_like(src)
    slices = [slice(i * src.size // threads, (i + 1) * src.size // threads) for i in range(threads)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))
            best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def linear_bytes(scheme: str, rows: int, cols: int, group: int) -> float:
    """Bytes of one linear's weight as XNNPACK holds it in the program."""
    if scheme == "8da4w":
        return rows * cols / 2 + rows * cols / group * 2  # two int4 per byte; a bf16 scale per group (QB4W)
    if scheme == "8da8w":
        return rows * cols + rows * 4  # int8; an fp32 scale per output channel (QC8W)
    if scheme == "none":
        return rows * cols * 4
    raise ValueError(f"no byte count for linear scheme {scheme}")


def embedding_row_bytes(scheme: str, cols: int, group: int) -> float:
    return {"8w": cols + 4, "4w": cols / 2 + cols / group * 4, "none": cols * 4}[scheme]


def decoder_linear_shapes(c: PretrainedConfig) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's q, k, v, o, gate, up, down."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    h, m = c.hidden_size, c.intermediate_size
    return [(q, h), (kv, h), (kv, h), (h, q), (m, h), (m, h), (h, m)]


def kv_bytes_per_position(c: PretrainedConfig, element_bytes: int) -> int:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * element_bytes


def pte_bytes_per_token(c: PretrainedConfig, options: dict, kv_positions: float) -> dict[str, float]:
    """Bytes one decode step of our program reads, by part, for the export's options (its report's
    `options`); the KV cache is fp32 and read up to the step's position."""
    group = options["group_size"]
    layer = sum(linear_bytes(options["qlinear"], o, i, group) for o, i in decoder_linear_shapes(c))
    return {
        "decoder linears": c.num_hidden_layers * layer,
        "lm_head": linear_bytes(options["lm_head"], c.vocab_size, c.hidden_size, group),
        "embedding row": embedding_row_bytes(options["qembedding"], c.hidden_size, group),
        "norms": (2 * c.num_hidden_layers + 1) * c.hidden_size * 4,
        "KV cache": kv_bytes_per_position(c, 4) * kv_positions,
    }


def gguf_bytes_per_token(path: Path, c: PretrainedConfig, kv_positions: float) -> dict[str, float]:
    """The same for llama.cpp on a GGUF file, from its tensors' stored sizes: with no `output.weight`
    the lm_head is the (tied) token embedding, read whole; llama.cpp's KV cache is f16."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    embedding = sizes["token_embd.weight"]
    return {
        "decoder layers": sum(n for name, n in sizes.items() if name.startswith("blk.")),
        "lm_head": sizes.get("output.weight", embedding),
        "embedding row": embedding / c.vocab_size,
        "norms": sizes.get("output_norm.weight", 0),
        "KV cache": kv_bytes_per_position(c, 2) * kv_positions,
    }
