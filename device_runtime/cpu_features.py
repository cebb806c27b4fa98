"""The CPU features that decide what int8 graphs are worth on this board, and ``--format auto``'s rule.

Read from ``/proc/cpuinfo`` (Linux and Android): the x86 ``flags`` line or the ARM ``Features`` line, the
CPU model (x86 ``model name``; ARM ``CPU implementer`` + ``CPU part``, named where the part is known, and a
board's ``Model`` line, e.g. "Raspberry Pi 4 Model B Rev 1.4"). Standard library only.

What matters for int8 matrix products:

- x86: ``avx2`` (int8 multiply-adds in several instructions: onnxruntime's AVX2 kernels), ``avx512f``,
  ``avx512_vnni`` / ``avx_vnni`` (VPDPBUSD: one instruction per 4 int8 products), ``amx_int8`` (tile matrix
  products);
- ARM: ``asimd`` (NEON: widening multiplies), ``asimddp`` (SDOT/UDOT, the ARMv8.2 dot product: Cortex-A55,
  A75, A76 and later), ``i8mm`` (SMMLA, ARMv8.6 int8 matrix multiply). A Cortex-A53 (Pi Zero 2 W, Pi 3) or
  A72 (Pi 4) has NEON but no SDOT; a Cortex-A76 (Pi 5) has SDOT.

:func:`choose_format` is the rule behind ``DeviceRuntime(fmt="auto")``, ``cartosplit run --format auto`` and
serve-device's ``format = "auto"``; a ``cartosplit bench device`` result measured on this machine overrides it.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from cartosplit.device_runtime.json_checks import read_json_file

CPUINFO = Path("/proc/cpuinfo")
X86_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx")  # amx: the amx_int8 (or amx_tile) flag
ARM_FEATURES = ("asimd", "asimddp", "i8mm")
AUTO = "auto"

# ARM Ltd (implementer 0x41) core parts, as Linux's arch/arm64/include/asm/cputype.h numbers them
ARM_PARTS = {
    0xD03: "Cortex-A53",
    0xD04: "Cortex-A35",
    0xD05: "Cortex-A55",
    0xD07: "Cortex-A57",
    0xD08: "Cortex-A72",
    0xD09: "Cortex-A73",
    0xD0A: "Cortex-A75",
    0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1",
    0xD0D: "Cortex-A77",
    0xD40: "Neoverse-V1",
    0xD41: "Cortex-A78",
    0xD44: "Cortex-X1",
    0xD46: "Cortex-A510",
    0xD47: "Cortex-A710",
    0xD48: "Cortex-X2",
    0xD49: "Neoverse-N2",
    0xD4D: "Cortex-A715",
    0xD4E: "Cortex-X3",
    0xD4F: "Neoverse-V2",
    0xD80: "Cortex-A520",
    0xD81: "Cortex-A720",
    0xD82: "Cortex-X4",
}
IMPLEMENTERS = {0x41: "ARM", 0x42: "Broadcom", 0x48: "HiSilicon", 0x51: "Qualcomm", 0x61: "Apple", 0xC0: "Ampere"}


@dataclass(frozen=True)
class CpuFeatures:
    """What /proc/cpuinfo says about this CPU. ``flags`` holds every flag; :meth:`summary` the ones that matter."""

    arch: str  # platform.machine(): x86_64, aarch64, ...
    model: str  # e.g. "AMD EPYC 7B13", "ARM Cortex-A72 (0x41:0xd08)"
    flags: frozenset[str] = field(default_factory=frozenset)
    board: str | None = None  # a board's Model line (Raspberry Pi), when the file has one
    logical_cpus: int = 0  # processor entries in the file
    source: str = str(CPUINFO)

    @property
    def family(self) -> str:
        """ "x86", "arm" or "other"."""
        arch = self.arch.lower()
        if arch in ("x86_64", "amd64", "i386", "i686", "x86"):
            return "x86"
        if arch.startswith(("aarch64", "arm")):
            return "arm"
        # no arch given (a sample in a test): tell from the flags
        if self.flags & {"sse2", "avx", "avx2"}:
            return "x86"
        return "arm" if self.flags & {"asimd", "neon", "fp"} else "other"

    def has(self, feature: str) -> bool:
        return feature in self.flags

    @property
    def int8_dot(self) -> str | None:
        """The int8 dot-product instruction set, best first: amx_int8, avx512_vnni, avx_vnni, i8mm, asimddp; None."""
        order = ("amx_int8", "avx512_vnni", "avx_vnni") if self.family == "x86" else ("i8mm", "asimddp")
        return next((f for f in order if f in self.flags), None)

    @property
    def int8_simd(self) -> bool:
        """Some SIMD path for int8 matrix products (x86 AVX2, ARM NEON), dot product or not."""
        return bool(self.flags & ({"avx2"} if self.family == "x86" else {"asimd", "neon"}))

    def summary(self) -> dict:
        """The features that decide int8's worth, as JSON-ready values."""
        names = X86_FEATURES if self.family == "x86" else ARM_FEATURES
        out = {
            "arch": self.arch,
            "family": self.family,
            "model": self.model,
            "board": self.board,
            "logical_cpus": self.logical_cpus,
            "features": {name: self._flag(name) for name in names},
            "int8_dot": self.int8_dot,
            "int8_simd": self.int8_simd,
            "int8_note": int8_note(self),
            "source": self.source,
        }
        return out

    def _flag(self, name: str) -> bool:
        return bool(self.flags & {"amx_int8", "amx_tile"}) if name == "amx" else name in self.flags

    def describe(self) -> str:
        """One line: model and the int8 verdict, e.g. "ARM Cortex-A72 (...): NEON, no SDOT"."""
        return f"{self.board + ', ' if self.board else ''}{self.model}: {int8_note(self)}"


def int8_note(cpu: CpuFeatures) -> str:
    """Why int8 is (or is not) cheap here, in words."""
    if cpu.family == "x86":
        if cpu.has("amx_int8"):
            return "AMX int8 tiles and VNNI: int8 matrix products at their fastest"
        if cpu.int8_dot:
            return f"{cpu.int8_dot.upper()} (one instruction per four int8 products)"
        if cpu.has("avx2"):
            return "AVX2 without VNNI: int8 products in several instructions"
        return "no AVX2: no fast int8 path known"
    if cpu.family == "arm":
        if cpu.has("i8mm"):
            return "NEON with SDOT and I8MM (int8 matrix multiply)"
        if cpu.has("asimddp"):
            return "NEON with SDOT (ARMv8.2 int8 dot product)"
        if cpu.int8_simd:
            return "NEON without SDOT: int8 by widening multiplies, a smaller gain over fp32"
        return "no NEON reported"
    return "unknown CPU family: no int8 verdict"


def _arm_model(fields: dict[str, str]) -> str | None:
    try:
        implementer = int(fields["CPU implementer"], 16)
        part = int(fields["CPU part"], 16)
    except (KeyError, ValueError):
        return None
    who = IMPLEMENTERS.get(implementer, f"implementer {implementer:#x}")
    name = ARM_PARTS.get(part) if implementer == 0x41 else None
    return f"{who} {name or 'part'} ({implementer:#x}:{part:#x})"


def parse_cpuinfo(text: str, arch: str = "", source: str = "cpuinfo text") -> CpuFeatures:
    """Features from the text of a /proc/cpuinfo (the first processor's entry; all entries' flags on big.LITTLE
    are intersected, so a feature counts only when every core has it)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    every = {k: v for b in blocks for k, v in b.items()}  # a board's lines sit in a block of their own (Pi)
    # "Model" names the board (Raspberry Pi); "Hardware" the SoC family, often misleading (BCM2835 on a Pi 4)
    board = every.get("Model") or every.get("Hardware") or None
    cores = [b for b in blocks if "processor" in b and ("flags" in b or "Features" in b or "model name" in b)]
    flag_sets = [frozenset((b.get("flags") or b.get("Features") or "").split()) for b in cores]
    flags = frozenset.intersection(*flag_sets) if flag_sets else frozenset()
    models: list[str] = []  # big.LITTLE: each kind of core once, in order
    for b in cores or blocks[:1]:
        name = b.get("model name") or _arm_model(b) or b.get("Processor") or b.get("cpu model")
        if name and name not in models:
            models.append(name)
    model = " + ".join(models) or every.get("Processor") or "unknown CPU"
    return CpuFeatures(arch=arch, model=model, flags=flags, board=board, logical_cpus=len(cores), source=source)


def read_cpu_features(path: str | Path = CPUINFO, arch: str | None = None) -> CpuFeatures:
    """This machine's features (an empty set, and a model from ``platform``, where the file is unreadable)."""
    arch = platform.machine() if arch is None else arch
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CpuFeatures(arch, platform.processor() or "unknown CPU", logical_cpus=os.cpu_count() or 0, source="none")
    return parse_cpuinfo(text, arch, str(path))


# --- --format auto -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatChoice:
    format: str
    reason: str


def passed_formats(manifest) -> list[str]:
    """The device formats a bundle holds that passed its validation (every one when it records none)."""
    held = [f for f in ("onnx-int8", "onnx-fp32", "tflite-int8", "tflite-fp32") if f in manifest.formats]
    verdicts = manifest.validation.formats if manifest.validation is not None else {}
    return [f for f in held if f not in verdicts or verdicts[f].passed]


def read_advice(path: str | Path) -> dict:
    """The ``advice`` of a ``cartosplit bench device`` result (its JSON file), with the CPU it was measured on."""
    path = Path(path)
    raw = read_json_file(path, "advice file")
    advice = raw.get("advice") if isinstance(raw, dict) else None
    if not isinstance(advice, dict) or not isinstance(advice.get("format"), str):
        raise ValueError(f"{path} is not a `cartosplit bench device` result (no advice.format)")
    cpu = raw.get("cpu") if isinstance(raw.get("cpu"), dict) else {}
    return {**advice, "cpu": cpu, "file": str(path)}


def _int8_evidence(cpu: CpuFeatures) -> str:
    if cpu.family == "x86":
        if cpu.int8_dot:
            return "int8 ran the device slice in 0.22-0.34x torch fp32's time with AVX-512 VNNI (x86 VMs, len 32-128)"
        return "int8 ran the device slice in 0.38-0.53x torch fp32's time with AVX2 alone (x86 VMs, length 32-128)"
    if cpu.int8_dot:
        return "SDOT runs int8 dot products in one instruction; weights a quarter of fp32's"
    return "a smaller gain than with SDOT, but weights a quarter of fp32's (memory, bandwidth)"


def _same_cpu(measured: dict, cpu: CpuFeatures) -> bool:
    return measured.get("model") == cpu.model and measured.get("arch") in (cpu.arch, None, "")


def choose_format(available: list[str], cpu: CpuFeatures, advice: dict | None = None) -> FormatChoice:
    """The device format ``auto`` picks among ``available`` (formats the bundle holds that passed validation).

    1. A ``cartosplit bench device`` result measured on this CPU (``advice``, see :func:`read_advice`): its
       fastest format, where the bundle has it.
    2. int8 where the CPU has a SIMD int8 path (x86 AVX2, ARM NEON): onnxruntime int8 ran the device slice at
       0.22x (length 32) and 0.34x (128) of torch eager fp32 on x86 with AVX-512 VNNI and at 0.38x and 0.53x
       with AVX2 alone, ahead of fp32 onnxruntime both times; on ARM without SDOT (Cortex-A53/A72) the gain is
       smaller but its weights are still a quarter of fp32's, which a 512 MB board needs. onnxruntime first
       (the default backend, the one measured), LiteRT where the bundle has no ONNX int8.
    3. Otherwise (no int8 in the bundle, int8 failed validation, or no SIMD int8 path): fp32, ONNX first.
    """
    if not available:
        raise ValueError("the bundle holds no device format that passed validation")
    if advice is not None:
        fmt = advice.get("format")
        where = advice.get("file", "the advice")
        if not _same_cpu(advice.get("cpu", {}), cpu):
            note = f"{where} was measured on {advice.get('cpu', {}).get('model', 'another CPU')}, not this one"
        elif fmt not in available:
            note = f"{where} advises {fmt}, which this bundle does not hold (or it failed validation)"
        else:
            return FormatChoice(fmt, f"measured fastest on this CPU ({where}): {advice.get('why', '')}".rstrip(": "))
    else:
        note = ""
    prefix = f"{note}; " if note else ""
    int8 = [f for f in ("onnx-int8", "tflite-int8") if f in available]
    fp32 = [f for f in ("onnx-fp32", "tflite-fp32") if f in available]
    if int8 and cpu.int8_simd:
        return FormatChoice(int8[0], prefix + f"int8 on {cpu.model}: {int8_note(cpu)}; {_int8_evidence(cpu)}")
    if fp32:
        why = "the bundle has no int8 that passed validation" if not int8 else f"{int8_note(cpu)}"
        return FormatChoice(fp32[0], prefix + f"fp32: {why}")
    return FormatChoice(int8[0], prefix + f"int8, the only format the bundle holds ({int8_note(cpu)})")
