import argparse
import io
import json
import os
import subprocess
import sys

import pytest

from spinquant.quiet import STDERR_NOISE_PREFIX, WARNING_NOISE, _LineDroppingStream, add_verbose_flag, verbose_requested

# A line of each known notice: torchao's, torch's pytree's, ExecuTorch's (export), cpuinfo's.
NOISE = ("Failed to load", "register_constant()", "FutureWarning", "Mutation on a buffer", "midr")
# Printed on every machine with the pinned torch and torchao (the CUDA-only .so lines need a CPU one).
ALWAYS_THERE = "is an Enum subclass and is now natively supported by torch.compile"


def run_python(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPINQUANT_VERBOSE"}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, env=env)


def test_cli_starts_without_the_libraries_notices():
    done = run_python("-m", "export.to_pte", "--help")  # imports torchao: its and the pytree notices
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)], done.stderr


def test_verbose_flag_shows_them():
    done = run_python("-m", "export.to_pte", "--help", "-v")
    assert done.returncode == 0, done.stderr[-2000:]
    assert ALWAYS_THERE in done.stderr


@pytest.mark.parametrize("value,verbose", [("1", True), ("0", False), ("", False)])
def test_verbose_environment_variable(monkeypatch, value, verbose):
    monkeypatch.setenv("SPINQUANT_VERBOSE", value)
    assert verbose_requested() is verbose


def test_verbose_flag_is_accepted_documented_and_not_stored():
    parser = argparse.ArgumentParser()
    add_verbose_flag(parser)
    assert vars(parser.parse_args(["-v"])) == vars(parser.parse_args(["--verbose"])) == vars(parser.parse_args([])) == {}
    assert "-v, --verbose" in parser.format_help()


def test_importing_the_library_adds_only_the_known_filters_and_keeps_stderr():
    script = (
        "import json, sys, warnings; before = list(warnings.filters); import spinquant\n"
        "print(json.dumps(sorted(f[1].pattern for f in warnings.filters if f not in before)))\n"
        "print(sys.stderr is sys.__stderr__)\n"
        "warnings.warn('a real one', FutureWarning)\n"
    )
    done = run_python("-c", script)
    added, stderr_kept = done.stdout.splitlines()
    assert json.loads(added) == sorted(message for _, message in WARNING_NOISE)
    assert stderr_kept == "True"
    assert "FutureWarning: a real one" in done.stderr


def write_in_pieces(stream, *pieces: str) -> None:
    for piece in pieces:
        stream.write(piece)
        stream.flush()


def test_runtime_log_lines_written_in_pieces_are_dropped_and_other_text_kept():
    out = io.StringIO()
    stream = _LineDroppingStream(out, STDERR_NOISE_PREFIX)
    write_in_pieces(stream, "[", "cpuinfo_utils.cpp", ":", "71", "] ", "Reading file /sys/devices/soc0/image_version", "\n")
    write_in_pieces(stream, "[", "method.cpp", ":", "80", "] ", "Missing operator: spinquant::hadamard_transform.out", "\n")
    write_in_pieces(stream, "note [cpuinfo_utils.cpp:1] quoted mid-line\n", "[cpuinfo_utils.cpp:125] CPU info\nlast")
    assert out.getvalue() == "[method.cpp:80] Missing operator: spinquant::hadamard_transform.out\nnote [cpuinfo_utils.cpp:1] quoted mid-line\nlast"


def test_text_that_cannot_become_a_dropped_line_passes_at_once():
    out = io.StringIO()
    stream = _LineDroppingStream(out, STDERR_NOISE_PREFIX)
    stream.write("\rLoading weights:  50%")
    assert out.getvalue() == "\rLoading weights:  50%"
    stream.write("\n[cpu")
    assert out.getvalue() == "\rLoading weights:  50%\n"  # held: it may still be a cpuinfo line
    stream.write("time] 3 s\n")
    assert out.getvalue() == "\rLoading weights:  50%\n[cputime] 3 s\n"
