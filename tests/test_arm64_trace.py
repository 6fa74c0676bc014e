"""runner/arm64_trace.py: instructions classed by their encoding, blocks placed in libraries and functions.
(The traced run itself under qemu is in tests/test_arm64.py.)"""

import pytest

from runner import arm64_trace
from runner.arm64_trace import extension, kernel_report, mapped_libraries

# Encodings GNU as 2.40 (aarch64-linux-gnu) gave for these instructions, -march=armv8.6-a+i8mm+dotprod+bf16+sve+fp16.
ASSEMBLED = {
    0x4E82A420: "i8mm",  # smmla v0.4s, v1.16b, v2.16b
    0x4E829C20: "i8mm",  # usdot v0.4s, v1.16b, v2.16b
    0x4E829420: "dot-product",  # sdot v0.4s, v1.16b, v2.16b
    0x4FA2E020: "dot-product",  # sdot v0.4s, v1.16b, v2.4b[1]
    0x6E42EC20: "bf16",  # bfmmla v0.4s, v1.8h, v2.8h
    0x04A20020: "SVE",  # add z0.s, z1.s, z2.s
    0xD503477F: "SME",  # smstart
    0xD503467F: "SME",  # smstop
    0x4E420C20: None,  # fmla v0.8h, v1.8h, v2.8h (FP16 arithmetic: not classed)
    0x4E20D420: None,  # fadd v0.4s, v1.4s, v0.4s
    0xD2800BA8: None,  # movz x8, #0x5d
    0xD4000001: None,  # svc #0
}


@pytest.mark.parametrize("word", ASSEMBLED)
def test_extension_of_an_assembled_instruction(word):
    assert extension(word) == ASSEMBLED[word]


MAPS = """5500000000-5500001000 r--p 00000000 00:00 1  /usr/lib/other.so
5502000000-5502010000 r--p 00000000 00:00 2  /env/site/executorch/lib/libexecutorch_backend_xnnpack.so
5502010000-5502080000 r-xp 00010000 00:00 2  /env/site/executorch/lib/libexecutorch_backend_xnnpack.so
5503000000-5503004000 r-xp 00000000 00:00 3  /env/libspinquant_kernels.so
"""

LOG = """----------------
IN:
0x5502010100:  4e82a420  .byte    0x20, 0xa4, 0x82, 0x4e
0x5502010104:  4e829420  .byte    0x20, 0x94, 0x82, 0x4e
0x5502010108:  d65f03c0  ret
----------------
IN:
0x5502020000:  4e20d420  fadd     v0.4s, v1.4s, v0.4s
0x5503000010:  d503201f  nop
0x5500000010:  4e82a420  .byte    0x20, 0xa4, 0x82, 0x4e
"""


def test_kernel_report_places_instructions_in_libraries_and_functions(tmp_path, monkeypatch):
    functions = {
        "libexecutorch_backend_xnnpack.so": [(0x10100, 0x10110, "kai_kernel_matmul_i8mm")],
        "libspinquant_kernels.so": [(0x0, 0x20, "spinquant_hadamard")],
    }
    monkeypatch.setattr(arm64_trace, "library_file", lambda library, env: library.name)
    monkeypatch.setattr(arm64_trace, "exported_functions", lambda name: functions[name])
    log = tmp_path / "log"
    log.write_text(LOG)
    report = kernel_report(log, MAPS, tmp_path)
    xnnpack = report["libexecutorch_backend_xnnpack.so"]
    assert xnnpack["instructions_by_extension"] == {"i8mm": 1, "dot-product": 1}
    assert xnnpack["instructions_by_function"] == {"kai_kernel_matmul_i8mm": 3, "(not exported)": 1}
    assert xnnpack["extensions_by_function"] == {"kai_kernel_matmul_i8mm": {"i8mm": 1, "dot-product": 1}}
    assert report["libspinquant_kernels.so"]["instructions_by_function"] == {"spinquant_hadamard": 1}
    assert "other.so" not in str(report)  # only the libraries a program's arithmetic runs in


def test_mapped_libraries_take_the_base_from_offset_zero():
    libraries = mapped_libraries(MAPS)
    xnnpack = libraries["libexecutorch_backend_xnnpack.so"]
    assert (xnnpack.start, xnnpack.end, xnnpack.base) == (0x5502000000, 0x5502080000, 0x5502000000)
    assert set(libraries) == {"libexecutorch_backend_xnnpack.so", "libspinquant_kernels.so"}
