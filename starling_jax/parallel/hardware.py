"""Hardware tables, in one place: peak FLOP/s per chip (for MFU), HBM per chip (for `aot`'s fits/does-not-fit) and
Cloud TPU topology names (for `aot --topology`). Vendor figures; dense bf16."""

from __future__ import annotations

import os

# Peak dense bf16 FLOP/s per chip (TFLOP/s), by `device_kind` substring.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
}

# HBM per chip (GiB) by `device_kind` substring; first match wins ("TPU v5 lite" before "TPU v5").
HBM_GIB = (
    ("TPU v5 lite", 16.0),
    ("TPU v5e", 16.0),
    ("TPU v6 lite", 32.0),
    ("TPU v6e", 32.0),
    ("TPU v5p", 95.0),
    ("TPU v5", 95.0),
    ("TPU v4", 32.0),
    ("H200", 141.0),
    ("H100", 80.0),
    ("A100", 80.0),
)

# Cloud TPU name → (libtpu topology name, chips). v4/v5p names count TensorCores (2 per chip, one megacore
# device); v5e/v6e names count chips. Shapes as Cloud TPU provisions them (MaxText's accelerator table).
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TPU_FAMILIES = {
    "v4": ("v4", 2, SHAPES_3D),
    "v5p": ("v5", 2, SHAPES_3D),
    "v5e": ("v5e", 1, SHAPES_2D),
    "v6e": ("v6e", 1, SHAPES_2D),
}

GIB = 1024**3


def peak_flops(cfg_value: float, device_kind: str | None = None) -> float | None:
    """Peak FLOP/s of one chip: the configured value (TFLOP/s), else looked up by device kind (default: this
    process's first device); None when unknown (CPU)."""
    if cfg_value:
        return cfg_value * 1e12
    if device_kind is None:
        import jax

        device_kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def hbm_capacity(device_kind: str, num_devices: int) -> tuple[int, str] | None:
    """→ (bytes per chip, where it came from), or None when the kind is unknown. A CPU "chip" gets its share of the
    host's RAM."""
    for name, gib in HBM_GIB:
        if name.lower() in device_kind.lower():
            return int(gib * GIB), f"{name} table"
    if device_kind.lower() == "cpu":
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return host // num_devices, "host RAM / devices"
    return None
