from spinquant.quiet import silence_known_noise

silence_known_noise()  # first: before any module here imports torchao or executorch

# The library's API, imported on first use so that `import spinquant.data` does not pull in torchao:
#     model = spinquant.prepare(model, "hadamard", spinquant.setting("w4a8"), spinquant.GPTQConfig(), tokenizer=tok)
_API = {
    "prepare": "spinquant.pipeline",
    "QuantConfig": "spinquant.quant",
    "setting": "spinquant.quant",
    "ProgramQuant": "spinquant.torchao_quant",
    "GPTQConfig": "spinquant.gptq",
    "GPTQResult": "spinquant.gptq",
    "Rotations": "spinquant.rotation",
    "default_rotation": "spinquant.rotation",
    "load_model": "spinquant.models",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'spinquant' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
