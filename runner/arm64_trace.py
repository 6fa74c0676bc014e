"""Which arm64 code an emulated run executed: the XNNPACK and KleidiAI kernels by name, and the
instruction-set extensions (dot-product, i8mm, SVE, SME) their instructions belong to.

qemu translates each guest basic block once, just before it first runs; `-d in_asm` logs it. The guest
(this module's `main`, under qemu) runs runner.greedy_record and then writes its /proc/self/maps, so
the host can place each logged block in a library and, by that library's exported symbols
(`nm -D -S`), in a function. XNNPACK's wheel exports its KleidiAI kernels and some of its own; the
rest are hidden, so their blocks count under "(not exported)" and are known by their instructions only.
"""

import json
import re
import shutil
import subprocess
import sys
from bisect import bisect_right
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from spinquant.errors import UserError, one_line_errors

# The libraries whose kernels a program's arithmetic runs in (delegate, portable/optimized ops, ours).
LIBRARIES = ("libexecutorch_backend_xnnpack.so", "libexecutorch_kernels_optimized.so", "libspinquant_kernels.so")
# A logged instruction: its address and its 32-bit encoding (Debian 12's qemu 7.2 prints the newer
# extensions as `.byte`, so they are told apart by encoding, from the Arm ARM's tables).
LINE = re.compile(r"^0x([0-9a-f]+):\s+([0-9a-f]{8})\s")
# (mask, value, extension): SMMLA/UMMLA/USMMLA and USDOT/SUDOT are FEAT_I8MM; SDOT/UDOT FEAT_DotProd.
ENCODINGS = (
    (0xFFE0F400, 0x4E80A400, "i8mm"),  # SMMLA, USMMLA (bit 11 tells them apart)
    (0xFFE0FC00, 0x6E80A400, "i8mm"),  # UMMLA
    (0xBFE0FC00, 0x0E809C00, "i8mm"),  # USDOT (vector)
    (0xBF40F400, 0x0F00F000, "i8mm"),  # SUDOT, USDOT (by element)
    (0xBFE0FC00, 0x0E809400, "dot-product"),  # SDOT (vector)
    (0xBFE0FC00, 0x2E809400, "dot-product"),  # UDOT (vector)
    (0xBFC0F400, 0x0F80E000, "dot-product"),  # SDOT (by element)
    (0xBFC0F400, 0x2F80E000, "dot-product"),  # UDOT (by element)
    (0xFFE0FC00, 0x6E40EC00, "bf16"),  # BFMMLA
    (0xBFE0FC00, 0x2E40FC00, "bf16"),  # BFDOT (vector)
    (0xBFC0F400, 0x0F40F000, "bf16"),  # BFDOT (by element)
    (0xBFE0FC00, 0x2EC0FC00, "bf16"),  # BFMLALB/T (vector)
    (0xFFFFF8FF, 0xD503407F, "SME"),  # SMSTART/SMSTOP (MSR SVCR*, #imm)
    (0x9E000000, 0x80000000, "SME"),  # the SME encoding group (op0 = 1xx0000)
    (0x1E000000, 0x04000000, "SVE"),  # the SVE encoding group (op0 = x0010)
)
EXTENSIONS = ("SME", "SVE", "i8mm", "dot-product", "bf16")


def extension(word: int) -> str | None:
    """The arm64 extension an instruction needs beyond base NEON, from its encoding (None: base)."""
    for mask, value, name in ENCODINGS:
        if word & mask == value:
            return name
    return None


@dataclass
class Library:
    """One mapped library: where it lies in the guest, and its exported functions (start, end, name)."""

    name: str
    path: str
    start: int
    end: int
    base: int
    functions: list[tuple[int, int, str]] = field(default_factory=list)

    def function_at(self, address: int) -> str:
        offset = address - self.base
        i = bisect_right(self.functions, (offset, float("inf"), "")) - 1
        if i >= 0 and self.functions[i][0] <= offset < self.functions[i][1]:
            return self.functions[i][2]
        return "(not exported)"


def mapped_libraries(maps_text: str) -> dict[str, Library]:
    """Each of LIBRARIES the guest mapped: its address range, and its base (the mapping of file offset 0)."""
    found: dict[str, Library] = {}
    for line in maps_text.splitlines():
        parts = line.split()
        if len(parts) < 6 or Path(parts[5]).name not in LIBRARIES:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        name, offset = Path(parts[5]).name, int(parts[2], 16)
        if name not in found:
            found[name] = Library(name, parts[5], start, end, start - offset)
        found[name].start, found[name].end = min(found[name].start, start), max(found[name].end, end)
    return found


def exported_functions(path: Path) -> list[tuple[int, int, str]]:
    """(start, end, name) of a library's exported functions, sorted, from the cross binutils' nm."""
    nm = shutil.which("aarch64-linux-gnu-nm")
    if nm is None:
        raise UserError("tracing arm64 kernels needs aarch64-linux-gnu-nm: apt-get install binutils-aarch64-linux-gnu")
    out = subprocess.run([nm, "-D", "--defined-only", "-S", str(path)], capture_output=True, text=True, check=True).stdout
    functions = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "TtWw":
            start = int(parts[0], 16)
            functions.append((start, start + int(parts[1], 16), parts[3]))
    return sorted(functions)


def library_file(library: Library, env_path: Path) -> Path:
    """The guest path of a mapped library, on the host (qemu -L maps the sysroot; the rest is shared)."""
    guest = Path(library.path)
    for candidate in (guest, env_path / "root" / guest.relative_to("/")):
        if candidate.is_file():
            return candidate
    raise UserError(f"the traced run mapped {guest}, which is not on this machine")


def kernel_report(log: Path, maps_text: str, env_path: Path) -> dict:
    """Per library: the instructions that ran by function (exported, or "(not exported)"), and by extension per
    function and in all."""
    libraries = mapped_libraries(maps_text)
    for library in libraries.values():
        library.functions = exported_functions(library_file(library, env_path))
    ranges = sorted((lib.start, lib.end, lib) for lib in libraries.values())
    functions: dict[str, Counter] = defaultdict(Counter)  # library → function → instructions
    extensions: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))  # library → function → kind → instructions
    with log.open(errors="replace") as f:
        for line in f:
            match = LINE.match(line)
            if match is None:
                continue
            address = int(match.group(1), 16)
            i = bisect_right(ranges, (address, float("inf"))) - 1
            if i < 0 or not ranges[i][0] <= address < ranges[i][1]:
                continue
            library = ranges[i][2]
            name = library.function_at(address)
            functions[library.name][name] += 1
            kind = extension(int(match.group(2), 16))
            if kind is not None:
                extensions[library.name][name][kind] += 1
    report = {}
    for name in libraries:
        by_function = {f: dict(kinds) for f, kinds in extensions[name].items()}
        totals = sum(extensions[name].values(), Counter())
        report[name] = {"instructions_by_function": dict(functions[name].most_common()),
                        "extensions_by_function": by_function,
                        "instructions_by_extension": {k: totals[k] for k in EXTENSIONS if totals[k]}}
    return report


def markdown(report: dict) -> str:
    """Per library, the extensions its executed instructions used, and its exported kernels that ran."""
    rows = ["| library | instructions run (translated once) | " + " | ".join(EXTENSIONS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in EXTENSIONS) + " |"]
    for name, entry in report.items():
        total = sum(entry["instructions_by_function"].values())
        rows.append(f"| {name} | {total} | " + " | ".join(str(entry["instructions_by_extension"].get(k, 0)) for k in EXTENSIONS) + " |")
    rows += ["", "| library | exported function that ran | its instructions | of which by extension |", "| --- | --- | --- | --- |"]
    for name, entry in report.items():
        for function, n in entry["instructions_by_function"].items():
            if not re.search(r"ukernel|^kai_|spinquant|hadamard", function):
                continue
            kinds = entry["extensions_by_function"].get(function, {})
            kinds = ", ".join(f"{k} {kinds[k]}" for k in EXTENSIONS if k in kinds)
            rows.append(f"| {name} | `{function}` | {n} | {kinds or '-'} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    """Guest side: `python -m runner.arm64_trace MAPS <greedy_record args>` under qemu."""
    from runner import greedy_record

    maps, record_argv = Path(argv[0]), argv[1:]
    greedy_record.main(record_argv)
    maps.write_text(Path("/proc/self/maps").read_text())


if __name__ == "__main__":
    with one_line_errors("runner.arm64_trace"):
        main(sys.argv[1:])
