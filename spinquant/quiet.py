"""The libraries' known start-up and export notices, silenced by exact source; real warnings stay.

Each one below was reproduced on a CPU machine (torch 2.13, torchao 0.18, executorch 1.5.1) and says
nothing a user can act on. `-v`/`--verbose` on a CLI, or SPINQUANT_VERBOSE=1, shows them all.
"""

import argparse
import logging
import os
import re
import sys
import warnings


class _MessageFilter(logging.Filter):
    """Drops a logger's records whose message matches `pattern`."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# logger name -> its known notice. Filters sit on the logger itself, so they see only its own records.
LOG_NOISE = {
    # torchao/__init__.py tries its CUDA-only extensions (MX fp8, CUTLASS sm90a) on every import.
    "torchao": _MessageFilter(r"^Failed to load \S*/torchao/_C_(mxfp8|cutlass_90a)\S*\.so: "),
    # torch deprecates register_constant() on Enums, which torchao still calls for its config enums.
    "torch.utils._pytree": _MessageFilter(r"is an Enum subclass and is now natively supported by torch\.compile"),
}

# (category, message regex) of warnings raised inside torch/executorch during export.
WARNING_NOISE = (
    # executorch's llama::update_cache / custom_sdpa fake kernels call torch._check_is_size.
    (FutureWarning, r"_check_is_size will be removed in a future PyTorch release"),
    # torch's own pytree, when executorch copies a LeafSpec.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # The KV cache is that buffer; attention reads only the positions already written, so its
    # initial state (not serialized) does not matter.
    (UserWarning, r"Mutation on a buffer in the model is detected"),
)

# ExecuTorch's threadpool sizing (extension/threadpool/cpuinfo_utils.cpp) logs its probe of
# /sys/.../midr_el1 when XNNPACK first loads a method. The pybindings print runtime logs to Python's
# sys.stderr, so these lines can be dropped there, by their prefix, and the runtime's other logs
# (a missing operator, say) still show.
STDERR_NOISE_PREFIX = "[cpuinfo_utils.cpp:"


class _LineDroppingStream:
    """A text stream, less the lines that start with `prefix`.

    The pybindings write a log line in pieces ("[", "cpuinfo_utils.cpp", ":", "71", "] ", text,
    "\\n"), so the start of a line that could still become a dropped line is held until it can be
    decided; any other text passes at once (a progress bar's "\\r" updates included).
    """

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix = stream, prefix
        self.held, self.at_line_start = "", True

    def write(self, text: str) -> int:
        pending, self.held = self.held + text, ""
        while pending:
            if not self.at_line_start:
                line, newline, pending = pending.partition("\n")
                self.stream.write(line + newline)
                self.at_line_start = bool(newline)
            elif pending.startswith(self.prefix):
                _, newline, rest = pending.partition("\n")
                if not newline:
                    self.held = pending
                    break
                pending = rest
            elif self.prefix.startswith(pending):
                self.held = pending
                break
            else:
                self.at_line_start = False
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


# Our packages' `__init__` import this module first, so in `python -m <package>.<module>` it is
# imported while Python locates the module: then, and only then, sys.argv[0] is "-m".
RUNNING_OUR_CLI = sys.argv[:1] == ["-m"]


def verbose_requested() -> bool:
    """SPINQUANT_VERBOSE=1, or -v/--verbose on one of our CLIs (read before argparse runs)."""
    flag = RUNNING_OUR_CLI and any(a in ("-v", "--verbose") for a in sys.argv[1:])
    return flag or os.environ.get("SPINQUANT_VERBOSE", "") not in ("", "0")


def silence_known_noise() -> None:
    """Silence exactly the known notices (idempotent); nothing when verbose.

    Importing the library installs the logging and warnings filters above and nothing broader; the
    stderr line filter is only for our own CLI processes, whose sys.stderr is theirs to wrap.
    """
    if verbose_requested():
        return
    for name, noise in LOG_NOISE.items():
        logging.getLogger(name).addFilter(noise)
    for category, message in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    if RUNNING_OUR_CLI and not isinstance(sys.stderr, _LineDroppingStream):
        sys.stderr = _LineDroppingStream(sys.stderr, STDERR_NOISE_PREFIX)


class _AppliedAtImport(argparse.Action):
    """-v/--verbose: read from sys.argv when the package was imported, so nothing is stored (a CLI
    that turns its namespace into options, as export.to_pte does, never sees it)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        pass


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """Let `parser` accept and document -v/--verbose."""
    parser.add_argument(
        "-v", "--verbose", action=_AppliedAtImport,
        help="show the libraries' start-up notices and warnings (also SPINQUANT_VERBOSE=1)",
    )
