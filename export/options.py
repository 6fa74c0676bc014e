"""Every export option as data: the CLI flags, the `--config FILE.yaml` keys and the report's record.

Combinations that cannot work are refused here, before a model is loaded.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from spinquant.errors import UserError
from spinquant.gptq import GPTQConfig, gptq_request
from spinquant.gptq_compact import packaged_gptq
from spinquant.rotation import default_rotation
from spinquant.torchao_quant import KV_CACHES, LM_HEAD, QEMBEDDING, QLINEAR, ProgramQuant

GROUP_SIZES = (32, 64, 128, 256)
DTYPES = ("fp32",)
# Measured with executorch 1.5.1: XNNPACK lowers torchao's weight-only linears (int4 and int8)
# to programs whose logits are off by more than the logits themselves, and left outside XNNPACK
# they need torchao::dequantize_affine, which has no ExecuTorch kernel. Refused until fixed.
BROKEN_LINEAR_SCHEMES = ("4w", "8w")


@dataclass
class ExportOptions:
    model: str = "smollm2-135m"
    rotation: str = ""  # empty: default_rotation(model); "learn"/"duquant": computed now for this model (spinquant/rotation_cache.py)
    qlinear: str = "8da4w"
    group_size: int = 32
    qembedding: str = "8w"
    # 1.4-1.6% lower perplexity than an 8da4w lm_head by GPTQ (results/lm_head_programs_cpu.md); 12 MB more to read per token
    lm_head: str = "8da8w"
    kv_cache: str = "int8"  # 3.8x fewer KV bytes, the same perplexity and a faster decode step (results/kv_cache_smollm2.md)
    r3: bool = True  # with a quantized KV cache, queries and keys turned by the online Hadamard after RoPE
    max_seq_len: int = 2048
    prefill_chunk: int = 256  # the most tokens one call takes (ExecuTorch's get_max_seq_len): activations are planned for it
    output_dir: Path = Path("out")
    dtype: str = "fp32"
    verify: bool = True
    full_logits: bool = False  # forward's logits for every position (evaluation), not the last one's (what ships)
    seed: int = 0
    # int4 weights by GPTQ (spinquant/gptq.py) on the calibration text, run now. None: with 8da4w linears, the packaged
    # result when one fits the export (the demo's, tuned on a GPU: spinquant/gptq_compact.py), else GPTQ now
    gptq: bool | None = None
    gptq_file: str = ""  # or a saved GPTQ result: python -m spinquant.eval --w-gptq --gptq-output FILE
    # 8 windows of 1,024 tokens: GPTQ of the demo in about 2 minutes on a 2-core CPU; 47 windows of 2,048 give a 3% lower
    # perplexity in 2.2 times the time (results/gptq_calibration.md)
    gptq_windows: int = 8
    gptq_seqlen: int = 1024
    calib_text: Path | None = None  # --gptq's and --rotation learn's or duquant's calibration text; None: the packaged one
    learn_iters: int = 100  # --rotation learn: Cayley SGD iterations (SpinQuant's 100)
    resume: bool = False  # --rotation learn: continue an interrupted run from its checkpoint

    def check(self) -> "ExportOptions":
        self.rotation = self.rotation or default_rotation(self.model)
        if self.kv_cache == "int4":
            raise UserError("--kv-cache int4: the program's attention kernel reads float32 or int8 rows, not int4; use int8 "
                            "(int4 keys are measured in fake quantization: python -m spinquant.eval --k-bits 4)")
        for name, allowed in (("qlinear", QLINEAR), ("qembedding", QEMBEDDING), ("lm_head", LM_HEAD), ("kv_cache", KV_CACHES), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} is not supported; choose one of {', '.join(allowed)}")
        for flag, scheme in (("qlinear", self.qlinear), ("lm-head", self.lm_head)):
            if scheme in BROKEN_LINEAR_SCHEMES:
                raise UserError(
                    f"--{flag} {scheme}: ExecuTorch 1.5.1 cannot run torchao's weight-only linears correctly; "
                    "use 8da4w or 8da8w"
                )
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"--group-size {self.group_size} is not supported; choose one of {GROUP_SIZES}")
        if self.gptq is None:
            if self.qlinear == "8da4w" and not self.gptq_file:
                self.gptq_file = packaged_gptq(self.model, self.rotation, self.group_size, lm_head=self.lm_head == "8da4w")
            self.gptq = self.qlinear == "8da4w" and not self.gptq_file
        if self.gptq and self.program_quant().codebook == "e8p":
            raise UserError("--gptq runs int4 GPTQ; for BlockLDLQ's E8P codes run python -m spinquant.eval --w-codebook e8p --w-gptq "
                            "--gptq-output FILE and give --gptq-file FILE (without it, each group takes its nearest codeword)")
        if self.gptq or self.gptq_file:
            self.program_quant().check_takes_gptq()
        if self.gptq and self.gptq_file:
            raise UserError("give --gptq (run GPTQ now) or --gptq-file (a saved result), not both")
        if self.max_seq_len < 2:
            raise UserError(f"--max-seq-len {self.max_seq_len} is too small; it must be at least 2")
        if self.prefill_chunk < 1:
            raise UserError(f"--prefill-chunk must be at least 1, not {self.prefill_chunk}")
        if self.gptq_windows < 1 or self.gptq_seqlen < 2:
            raise UserError(f"--gptq-windows must be at least 1 and --gptq-seqlen at least 2, not {self.gptq_windows} and {self.gptq_seqlen}")
        if self.learn_iters < 1:
            raise UserError(f"--learn-iters must be at least 1, not {self.learn_iters}")
        if self.resume and self.rotation != "learn":
            raise UserError("--resume continues learning rotations: it goes with --rotation learn")
        return self

    def learning_recipe(self) -> str:
        """spinquant.optimize's recipe that fits this quantization: int4 round-to-nearest weights in the loss for 8da4w
        linears, GPTQ or not (with GPTQ it beat the W16A8 recipe on the demo, 20.43 against 20.50: results/gptq_smollm2.md);
        8-bit ones are not, as in SpinQuant's and ExecuTorch's W16A8."""
        return "w4a8" if self.qlinear == "8da4w" else "executorch"

    def program_quant(self) -> ProgramQuant:
        return ProgramQuant.of(dataclasses.asdict(self))

    def gptq_request(self) -> GPTQConfig | Path | None:
        """GPTQ to run now (--gptq), a saved result's file (--gptq-file), or None."""
        return gptq_request(dataclasses.asdict(self))

    def record(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


def options_from_yaml(path: Path) -> dict:
    """Keys mirror the flags (dashes or underscores); unknown keys are refused."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"config file {path} is not valid YAML: fix its syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    known = {f.name for f in dataclasses.fields(ExportOptions)}
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    if unknown := sorted(set(values) - known):
        raise UserError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    for key in ("output_dir", "calib_text"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    return values
