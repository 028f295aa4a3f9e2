"""INT8 weight recipes, the CPU's instruction sets, and the order in which the tuning tries recipes.

Why the CPU matters. ONNX Runtime multiplies uint8 activations by int8 weights (U8S8) with the
fastest kernel the CPU offers, picked by CPUID. With AVX-512 VNNI / AVX-VNNI / AMX the products
are summed straight into int32. On AVX2 without VNNI (and AVX-512 without VNNI) the kernel uses
``vpmaddubsw``, which adds *pairs* of uint8 x int8 products into int16 and saturates at 32767:
255 x 127 x 2 does not fit. Full-range int8 weights then overflow wherever two neighbouring
activation codes are large, which is common once SmoothQuant has moved outliers into the weights
(MiniLM on an AMD EPYC: per-token cosine-min -0.09). Two ways out: 7-bit weights
(``reduce_range``: 255 x 63 x 2 fits) or uint8 weights (U8U8, summed in int16 products without
pairs: exact, but ~1.2x the U8S8 time there).

The instruction set is only a *hint* for the order of tries (``recipe_order``); which recipe is
used is decided by measuring them on calibration rows (``worker.support.quant_tuning``), since a
CPU flag says nothing about a given model's activations, and emulators or new kernels may differ.
``saturation_finding`` turns those measurements into the report's sentence: 8-bit weights losing
to 7-bit ones can only be the overflow, since in exact arithmetic more bits are never worse.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from worker.support.quant_calibration import Score

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 flags whose int8 dot products sum into int32


@dataclass(frozen=True)
class WeightRecipe:
    """How the weights are quantized: int8 or uint8 codes, full range or 7-bit (``reduce_range``)."""

    weight_type: str  # "int8" or "uint8"
    reduce_range: bool = False

    @property
    def label(self) -> str:
        return f"{self.weight_type}{' 7-bit' if self.reduce_range else ''}"

    def to_dict(self) -> dict:
        return {"weight_type": self.weight_type, "reduce_range": self.reduce_range}


INT8 = WeightRecipe("int8")
INT8_7BIT = WeightRecipe("int8", reduce_range=True)
UINT8 = WeightRecipe("uint8")


@dataclass(frozen=True)
class CpuIsa:
    """The instruction sets of this CPU that decide ONNX Runtime's int8 kernels."""

    machine: str
    flags: frozenset[str]
    model: str = "unknown"

    @property
    def x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i686", "x86")

    @property
    def int32_dot_products(self) -> bool:
        """True where the int8 dot products are summed into int32 (no int16 saturation): VNNI, AMX, ARM."""
        return not self.x86 or any(flag in self.flags for flag in VNNI_FLAGS)

    @property
    def label(self) -> str:
        """The hardware class (``shared.inference.hardware``): cpu-amx, cpu-avx512-vnni, cpu-avx2, ..."""
        from shared.inference.hardware import cpu_class

        return cpu_class(set(self.flags), self.machine)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "cpu": self.model, "class": self.label, "flags": sorted(self.flags)}


def cpu_isa(cpuinfo: str | None = None) -> CpuIsa:
    """This machine's CPU (``/proc/cpuinfo`` on Linux; no flags known elsewhere)."""
    from shared.inference.hardware import ISA_FLAGS, cpu_flags, cpu_model

    flags = cpu_flags(cpuinfo) & set(ISA_FLAGS)
    return CpuIsa(machine=platform.machine(), flags=frozenset(flags), model=cpu_model(cpuinfo))


def recipe_order(isa: CpuIsa) -> list[WeightRecipe]:
    """The recipes to try, most promising first: 7-bit int8 first where the kernel may saturate."""
    if isa.int32_dot_products:
        return [INT8, INT8_7BIT, UINT8]
    return [INT8_7BIT, INT8, UINT8]


def saturation_finding(scores: dict[WeightRecipe, Score], isa: CpuIsa, why_one: str = "") -> str:
    """What the fit rows say about int16 saturation, for the report.

    In exact arithmetic an 8th weight bit quarters the weights' share of the error, so 8-bit int8
    weights measuring *more* error than 7-bit ones (by half again, past rounding) is the overflow.
    """
    full, seven = scores.get(INT8), scores.get(INT8_7BIT)
    hint = "int32 dot products, no saturation expected" if isa.int32_dot_products else "int16 pair sums"
    if full is None or seven is None:
        return f"not measured (one int8 recipe tried{': ' + why_one if why_one else ''}); CPU {isa.label}: {hint}"
    figures = f"8-bit weights cosine-min {full.cosine_min:.4f}, 7-bit {seven.cosine_min:.4f} on the fit rows"
    if full.tail_error > 1.5 * seven.tail_error + 1e-6:
        return f"detected: {figures}; CPU {isa.label}: {hint}"
    return f"not detected: {figures}; CPU {isa.label}: {hint}"
