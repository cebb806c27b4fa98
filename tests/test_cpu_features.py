"""/proc/cpuinfo samples -> the int8 features, and the ``--format auto`` rule, without a model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cartosplit.device_runtime.cpu_features import (
    CpuFeatures,
    choose_format,
    parse_cpuinfo,
    passed_formats,
    read_advice,
    read_cpu_features,
)

# An Intel Xeon (Ice Lake server) as a cloud VM shows it: AVX-512 with VNNI (flags trimmed to the relevant ones
# and their neighbours; two processors to show that every one is read)
XEON_VNNI = """\
processor	: 0
vendor_id	: GenuineIntel
cpu family	: 6
model		: 106
model name	: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
stepping	: 6
cpu MHz		: 2899.968
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx lm avx f16c avx2 fma bmi1 bmi2 \
avx512f avx512dq avx512cd avx512bw avx512vl avx512ifma avx512vbmi avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni \
avx512_bitalg avx512_vpopcntdq
bogomips	: 5799.93

processor	: 1
vendor_id	: GenuineIntel
cpu family	: 6
model		: 106
model name	: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx lm avx f16c avx2 fma bmi1 bmi2 \
avx512f avx512dq avx512cd avx512bw avx512vl avx512ifma avx512vbmi avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni \
avx512_bitalg avx512_vpopcntdq
bogomips	: 5799.93
"""

# an AMD EPYC (Zen 3) VM: AVX2, no AVX-512, no VNNI
EPYC_AVX2 = """\
processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: AMD EPYC 7B13
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat sse sse2 ht syscall nx mmxext \
fxsr_opt pdpe1gb rdtscp lm pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand \
bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt vaes vpclmulqdq rdpid fsrm
bogomips	: 4899.99
"""

# a Raspberry Pi 4 Model B on 64-bit Raspberry Pi OS: Cortex-A72 (0xd08), NEON, no dot product
PI4_A72 = (
    "".join(
        f"""processor	: {i}
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3

"""
        for i in range(4)
    )
    + """Hardware	: BCM2835
Revision	: d03114
Serial		: 10000000a1b2c3d4
Model		: Raspberry Pi 4 Model B Rev 1.4
"""
)

# a Raspberry Pi 5: Cortex-A76 (0xd0b), NEON with the ARMv8.2 dot product (asimddp)
PI5_A76 = (
    "".join(
        f"""processor	: {i}
BogoMIPS	: 108.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x4
CPU part	: 0xd0b
CPU revision	: 1

"""
        for i in range(4)
    )
    + """Revision	: c04170
Serial		: 1a2b3c4d5e6f7a8b
Model		: Raspberry Pi 5 Model B Rev 1.0
"""
)

# a phone SoC, big.LITTLE: 2 x Cortex-A76 (asimddp, i8mm absent) + 2 x Cortex-A55 without i8mm either
PHONE_BIG_LITTLE = """\
processor	: 0
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU part	: 0xd05

processor	: 1
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU part	: 0xd05

processor	: 2
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp i8mm
CPU implementer	: 0x41
CPU part	: 0xd0b
"""

ALL = ["onnx-int8", "onnx-fp32", "tflite-int8", "tflite-fp32"]


def test_x86_with_avx512_vnni():
    cpu = parse_cpuinfo(XEON_VNNI, "x86_64")
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz" and cpu.logical_cpus == 2
    s = cpu.summary()
    assert s["family"] == "x86"
    assert s["features"] == {"avx2": True, "avx512f": True, "avx512_vnni": True, "avx_vnni": False, "amx": False}
    assert s["int8_dot"] == "avx512_vnni" and s["int8_simd"] and "VNNI" in s["int8_note"]


def test_x86_with_avx2_only():
    cpu = parse_cpuinfo(EPYC_AVX2, "x86_64")
    s = cpu.summary()
    assert s["model"] == "AMD EPYC 7B13" and s["board"] is None
    assert s["features"] == {"avx2": True, "avx512f": False, "avx512_vnni": False, "avx_vnni": False, "amx": False}
    assert s["int8_dot"] is None and s["int8_simd"] and "without VNNI" in s["int8_note"]


def test_amx_counts_as_the_best_x86_int8_path():
    cpu = CpuFeatures("x86_64", "Xeon", frozenset({"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}))
    assert cpu.int8_dot == "amx_int8" and cpu.summary()["features"]["amx"] and "AMX" in cpu.describe()


def test_cortex_a72_has_neon_but_no_sdot():
    cpu = parse_cpuinfo(PI4_A72, "aarch64")
    assert cpu.model == "ARM Cortex-A72 (0x41:0xd08)"
    assert cpu.board == "Raspberry Pi 4 Model B Rev 1.4"  # the Model line, not "Hardware: BCM2835"
    assert cpu.logical_cpus == 4
    s = cpu.summary()
    assert s["family"] == "arm" and s["features"] == {"asimd": True, "asimddp": False, "i8mm": False}
    assert s["int8_dot"] is None and s["int8_simd"] and "without SDOT" in s["int8_note"]


def test_cortex_a76_has_sdot():
    cpu = parse_cpuinfo(PI5_A76, "aarch64")
    assert cpu.model == "ARM Cortex-A76 (0x41:0xd0b)" and cpu.board.startswith("Raspberry Pi 5")
    assert cpu.summary()["features"] == {"asimd": True, "asimddp": True, "i8mm": False}
    assert cpu.int8_dot == "asimddp" and "SDOT" in cpu.describe()


def test_big_little_names_each_core_and_counts_a_feature_only_if_every_core_has_it():
    cpu = parse_cpuinfo(PHONE_BIG_LITTLE, "aarch64")
    assert cpu.model == "ARM Cortex-A55 (0x41:0xd05) + ARM Cortex-A76 (0x41:0xd0b)"
    assert cpu.has("asimddp") and not cpu.has("i8mm")  # only the big core has i8mm: a thread may run anywhere


def test_family_is_told_from_the_flags_without_an_arch():
    assert parse_cpuinfo(EPYC_AVX2).family == "x86"
    assert parse_cpuinfo(PI4_A72).family == "arm"
    assert parse_cpuinfo("").family == "other" and parse_cpuinfo("").model == "unknown CPU"


def test_this_machine_and_an_unreadable_file(tmp_path):
    here = read_cpu_features()
    assert here.arch and here.model
    missing = read_cpu_features(tmp_path / "no-cpuinfo", arch="aarch64")
    assert missing.source == "none" and missing.flags == frozenset() and not missing.int8_simd


# -- --format auto -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", [XEON_VNNI, EPYC_AVX2, PI4_A72, PI5_A76])
def test_int8_onnx_wherever_there_is_a_simd_int8_path(sample):
    # the evidence: onnxruntime int8 beat fp32 with AVX-512 VNNI and with AVX2 alone; on ARM the gain is
    # smaller without SDOT but the weights are a quarter of fp32's
    arch = "x86_64" if "flags" in sample else "aarch64"
    choice = choose_format(ALL, parse_cpuinfo(sample, arch))
    assert choice.format == "onnx-int8" and "int8" in choice.reason


def test_tflite_int8_when_the_bundle_has_no_onnx_int8():
    assert choose_format(["tflite-int8", "tflite-fp32", "onnx-fp32"], parse_cpuinfo(PI4_A72, "aarch64")).format == (
        "tflite-int8"
    )


def test_fp32_without_a_simd_int8_path_or_without_int8():
    old = CpuFeatures("x86_64", "an old Atom", frozenset({"sse2", "sse4_2"}))
    choice = choose_format(ALL, old)
    assert choice.format == "onnx-fp32" and "no AVX2" in choice.reason
    choice = choose_format(["onnx-fp32", "tflite-fp32"], parse_cpuinfo(PI5_A76, "aarch64"))
    assert choice.format == "onnx-fp32" and "no int8" in choice.reason


def test_int8_when_it_is_all_the_bundle_holds():
    old = CpuFeatures("x86_64", "an old Atom", frozenset({"sse2"}))
    choice = choose_format(["tflite-int8"], old)
    assert choice.format == "tflite-int8" and "only format" in choice.reason
    with pytest.raises(ValueError, match="no device format"):
        choose_format([], old)


def _advice(tmp_path, fmt: str, model: str, arch: str = "aarch64"):
    path = tmp_path / "device.json"
    cpu = {"model": model, "arch": arch}
    path.write_text(json.dumps({"advice": {"format": fmt, "why": "measured fastest"}, "cpu": cpu}))
    return read_advice(path)


def test_a_measurement_on_this_cpu_wins(tmp_path):
    cpu = parse_cpuinfo(PI4_A72, "aarch64")
    choice = choose_format(ALL, cpu, _advice(tmp_path, "tflite-int8", cpu.model))
    assert choice.format == "tflite-int8" and "measured fastest on this CPU" in choice.reason


def test_a_measurement_of_another_cpu_or_format_is_not_used_and_says_so(tmp_path):
    cpu = parse_cpuinfo(PI4_A72, "aarch64")
    choice = choose_format(ALL, cpu, _advice(tmp_path, "tflite-fp32", "ARM Cortex-A76 (0x41:0xd0b)"))
    assert choice.format == "onnx-int8" and "not this one" in choice.reason
    choice = choose_format(["onnx-int8", "onnx-fp32"], cpu, _advice(tmp_path, "tflite-int8", cpu.model))
    assert choice.format == "onnx-int8" and "does not hold" in choice.reason


def test_bad_advice_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_advice(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_advice(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="bench device"):
        read_advice(tmp_path / "other.json")


def test_only_formats_that_passed_validation_are_candidates():
    verdicts = {"onnx-int8": SimpleNamespace(passed=False), "onnx-fp32": SimpleNamespace(passed=True)}
    manifest = SimpleNamespace(
        formats={"onnx-int8": {}, "onnx-fp32": {}, "tflite-int8": {}}, validation=SimpleNamespace(formats=verdicts)
    )
    assert passed_formats(manifest) == ["onnx-fp32", "tflite-int8"]  # tflite-int8: no verdict recorded
    assert passed_formats(SimpleNamespace(formats={"onnx-fp32": {}}, validation=None)) == ["onnx-fp32"]
