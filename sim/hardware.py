"""Accelerator and interconnect presets from datasheets (see ../shared/REFERENCE.md for the table and its sources).

Figures are per GPU, dense (no sparsity), one direction for links. ``LinkSpec.latency_s`` is a per-transfer start-up cost.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
GB = 1e9


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator: peak dense bf16 FLOP/s, HBM bytes/s, memory bytes, intra-node (NVLink) and scale-out bytes/s."""

    name: str
    bf16_flops: float
    fp8_flops: float
    hbm_bytes_per_s: float
    memory_bytes: int
    nvlink_bytes_per_s: float
    scaleout_bytes_per_s: float
    power_w: float
    price_per_hour: float  # a typical on-demand cloud price, USD per GPU-hour; overridable by the user

    def __post_init__(self) -> None:
        if min(self.bf16_flops, self.hbm_bytes_per_s, self.memory_bytes) <= 0:
            raise ValueError(f"hardware {self.name!r}: FLOP/s, HBM bytes/s and memory must be positive")


@dataclass(frozen=True)
class LinkSpec:
    """A point-to-point path for KV transfer: ``bandwidth_bytes_per_s`` one direction, ``latency_s`` per transfer."""

    name: str
    bandwidth_bytes_per_s: float
    latency_s: float

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError(f"link {self.name!r}: bandwidth must be positive, got {self.bandwidth_bytes_per_s}")
        if self.latency_s < 0:
            raise ValueError(f"link {self.name!r}: latency must be >= 0, got {self.latency_s}")

    def transfer_s(self, nbytes: float) -> float:
        """Time to move ``nbytes`` over an otherwise idle link."""
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


HARDWARE: dict[str, HardwareSpec] = {
    h.name: h
    for h in [
        HardwareSpec("a100-80g-sxm", 312e12, 0.0, 2.039e12, 80 * GIB, 300 * GB, 25 * GB, 400, 1.8),
        HardwareSpec("h100-sxm", 989e12, 1978e12, 3.35e12, 80 * GIB, 450 * GB, 50 * GB, 700, 3.0),
        HardwareSpec("h200-sxm", 989e12, 1978e12, 4.8e12, 141 * GIB, 450 * GB, 50 * GB, 700, 3.8),
        HardwareSpec("b200", 2250e12, 4500e12, 7.7e12, 180 * GIB, 900 * GB, 100 * GB, 1000, 6.0),
        HardwareSpec("gb200", 2500e12, 5000e12, 8.0e12, 185 * GIB, 900 * GB, 900 * GB, 1200, 7.0),
        HardwareSpec("l40s", 362e12, 733e12, 0.864e12, 45 * GIB, 32 * GB, 50 * GB, 350, 1.0),
    ]
}

# Per-transfer latencies: ~10 us point-to-point on NVLink (aiconfigurator-core's system files); a few us more through
# PCIe; RDMA fabrics ~5-20 us; TCP tens of us plus protocol overhead. Bandwidths are line rates, one direction.
LINKS: dict[str, LinkSpec] = {
    link.name: link
    for link in [
        LinkSpec("nvlink3", 300 * GB, 10e-6),
        LinkSpec("nvlink4", 450 * GB, 10e-6),
        LinkSpec("nvlink5", 900 * GB, 10e-6),
        LinkSpec("pcie4", 32 * GB, 15e-6),
        LinkSpec("pcie5", 64 * GB, 15e-6),
        LinkSpec("ib-ndr400", 50 * GB, 20e-6),
        LinkSpec("roce100", 12.5 * GB, 25e-6),
        LinkSpec("roce200", 25 * GB, 25e-6),
        LinkSpec("roce400", 50 * GB, 25e-6),
        LinkSpec("eth25", 3.125 * GB, 50e-6),
        LinkSpec("eth100", 12.5 * GB, 50e-6),
    ]
}


def get_hardware(name: str) -> HardwareSpec:
    key = name.lower()
    if key not in HARDWARE:
        raise ValueError(f"unknown hardware preset {name!r}; expected one of {', '.join(sorted(HARDWARE))}")
    return HARDWARE[key]


def get_link(name: str, extra: dict[str, LinkSpec] | None = None) -> LinkSpec:
    """A link preset by name; ``extra`` (e.g. a calibrated profile's measured transports) is searched first."""
    key = name.lower()
    if extra and key in extra:
        return extra[key]
    if key not in LINKS:
        known = sorted(set(LINKS) | set(extra or {}))
        raise ValueError(f"unknown link {name!r}; expected one of {', '.join(known)}")
    return LINKS[key]
