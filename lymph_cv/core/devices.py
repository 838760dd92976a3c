"""One device resolver for every stage that runs a net (train, evaluate, ``caffe``, pycaffe)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Sequence

from lymph_cv.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: What a device option accepts (``cuda:N`` picks the N-th CUDA device).
DEVICE_CHOICES = ("cpu", "cuda", "auto")
DEVICE_HELP = ("cpu", "cuda", "auto", "cuda:N")
#: Evaluation's choices: a concrete device (what it ran on is recorded with its metrics).
CONCRETE_DEVICES = ("cpu", "cuda")
#: The NVIDIA kernel module's version file: present wherever a CUDA driver is loaded.
NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"
#: The CUDA driver library's name for ctypes.util.find_library.
CUDA_LIBRARY = "cuda"
#: Where Linux lists the CPU's features, and the ones that give bfloat16 arithmetic: x86's AMX and
#: AVX512-BF16 (``flags``), Arm's BF16 (``Features``).
CPUINFO_FILE = "/proc/cpuinfo"
BFLOAT16_FEATURES = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


def cuda_absent() -> bool:
    """True when this machine surely has no CUDA, decided without importing torch: no NVIDIA kernel
    module and no libcuda the loader finds."""
    if os.path.exists(NVIDIA_DRIVER_FILE):
        return False
    import ctypes.util

    return ctypes.util.find_library(CUDA_LIBRARY) is None


def cpu_has_bfloat16(cpuinfo: Optional[str] = None) -> bool:
    """Whether the CPU computes in bfloat16 natively (else torch emulates it, several times slower
    than float32), from ``cpuinfo`` (default :data:`CPUINFO_FILE`); True where the features cannot be
    read (not Linux: nothing is assumed away)."""
    try:
        with open(cpuinfo or CPUINFO_FILE, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return True
    listed = [line.split(":", 1)[1].split() for line in text.splitlines()
              if line.split(":", 1)[0].strip() in ("flags", "Features") and ":" in line]
    if not listed:
        return True
    return bool(BFLOAT16_FEATURES.intersection(listed[0]))


def resolves_to_cpu(name: str, choices: Sequence[str] = DEVICE_CHOICES) -> bool:
    """Whether device ``name`` is the CPU, decided without importing torch (for torch-free paths):
    ``cpu``, or ``auto`` (when among ``choices``) where :func:`cuda_absent`.  False means: ask
    :func:`resolve_device` (which also rejects what is not a device)."""
    wanted = str(name).lower()
    return wanted == "cpu" or (wanted == "auto" and "auto" in choices and cuda_absent())


def resolve_device(name: str, choices: Sequence[str] = DEVICE_CHOICES) -> "torch.device":
    """``cpu``, ``cuda``, ``cuda:N`` or (when among ``choices``) ``auto`` (CUDA when available) as a torch
    device; a ConfigError for anything else, for CUDA on a machine without it, and for a CUDA index it
    does not have."""
    import torch  # here, not at import: the CLI must not load torch for data commands

    wanted = str(name).lower()
    index = None
    if wanted.startswith("cuda:") and wanted[5:].isdigit():
        wanted, index = "cuda", int(wanted[5:])
    if wanted not in choices:
        raise ConfigError(f"unknown device {name!r}", valid=(*choices, "cuda:N"))
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA was asked for but no CUDA device is available", valid=("cpu", "auto"))
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"no CUDA device {index} (this machine has {torch.cuda.device_count()})")
    return torch.device(wanted, index) if index is not None else torch.device(wanted)
