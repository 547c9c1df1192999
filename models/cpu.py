"""What the host CPU can do, for programs that need more than the compile target implies (torch-free).

A program exported with `--amx` (models.amx) lists "amx-int8" in its config's `cpu_features`, one exported
with `--cpu-attention` (models.paged_attention) "x86-64-v3" or "x86-64-v4"; the runner checks the host has
them and asks Linux for the AMX tile state, which a process gets only on request.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
X86_64_V3, X86_64_V4 = "x86-64-v3", "x86-64-v4"  # what models.paged_attention's kernel is built for
AVX512_VNNI = "x86-64-v4-vnni"  # models.qmatmul's AVX-512 build
# cpu_features names -> /proc/cpuinfo flags
_FLAGS = {
    "amx-int8": ("amx_tile", "amx_int8"),
    X86_64_V3: ("avx2", "fma", "f16c"),
    X86_64_V4: ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"),
    AVX512_VNNI: ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"),
}
# the export option that needs each
_EXPORT_FLAG = {
    "amx-int8": "--amx",
    X86_64_V3: "--cpu-attention or --cpu-matmul",
    X86_64_V4: "--cpu-attention",
    AVX512_VNNI: "--cpu-matmul",
}
# `--cpu-attention`'s ISAs -> the feature each build needs, best first
ATTENTION_ISAS = {"avx512": X86_64_V4, "avx2": X86_64_V3}
# `--cpu-matmul`'s (models.qmatmul)
MATMUL_ISAS = {"avx512": AVX512_VNNI, "avx2": X86_64_V3}


def host_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def supports(features: list[str]) -> bool:
    flags = host_flags()
    return all(set(_FLAGS[f]) <= flags for f in features)


def attention_isa() -> str | None:
    """The best `--cpu-attention` ISA this CPU runs (None: none)."""
    return next((isa for isa, feature in ATTENTION_ISAS.items() if supports([feature])), None)


def matmul_isa() -> str | None:
    """The best `--cpu-matmul` ISA this CPU runs (None: none)."""
    return next((isa for isa, feature in MATMUL_ISAS.items() if supports([feature])), None)


def host_has_amx() -> bool:
    return supports(["amx-int8"])


def require(features: list[str]) -> None:
    """Raise ValueError (with a hint) unless the host has `features`; grant this process AMX where needed."""
    flags = host_flags()
    for feature in features:
        if feature not in _FLAGS:
            raise ValueError(f"the program needs the CPU feature {feature!r}, which this version does not know")
        if not set(_FLAGS[feature]) <= flags:
            raise ValueError(
                f"the program needs a CPU with {feature} (it was exported with {_EXPORT_FLAG[feature]}); this "
                f"CPU lacks it: re-export without {_EXPORT_FLAG[feature]}"
            )
        if feature == "amx-int8":
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
                raise ValueError(
                    f"Linux refused this process the AMX tile state (arch_prctl errno "
                    f"{ctypes.get_errno()}); hint: a kernel >= 5.16 grants it, or re-export without --amx"
                )
