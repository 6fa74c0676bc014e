"""`python scripts/llama3_8b_one_layer.py DIR`: a random Llama-3-8B-shaped model with one layer, for arm64 checks.

Hidden 4,096, 32 heads / 8 KV heads of 128, untied 128,256-token vocabulary and intermediate 14,336
= 28·2⁹ (the size where ExecuTorch's own Hadamard op is wrong), drawn in bf16 as
benchmarks/export_time.py draws its shapes, with the demo's tokenizer beside it (a program made
from it is run with token ids). Export: python -m export.to_pte --model DIR --max-seq-len 64 --full-logits (runner.arm64 compares every position).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from export_time import LLAMA_3, Shape, write_random_model  # noqa: E402

SHAPE = Shape("Llama 3 8B, one layer", dict(
    LLAMA_3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, tie_word_embeddings=False), Path("results/arm64.md"))

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.splitlines()[0])
    write_random_model(Path(sys.argv[1]), SHAPE)
    print(sys.argv[1])
