"""The chips jaxent is compiled for without a device, from their public specifications.

Each :class:`Chip` holds what the deviceless compile check (:mod:`jaxent.bench.compiled`)
and the roofline (:func:`roofline`) need: how many programs fill it (SMs or TensorCores),
its dense bf16 rate, its HBM bandwidth and size. For a GPU, :func:`gpu_target_config`
writes XLA's ``GpuTargetConfigProto`` text from the same fields, so the CUDA plugin
compiles (ptxas included) for that chip on a host with no GPU; for a TPU, libtpu knows the
chip by its topology name (:func:`device`).

The floor of a fused linear head's forward and backward, ``[N, D] x [D, V]``, is the larger
of ``6 N D V`` flops at the bf16 rate (three matmuls: logits, ``d hidden``, ``d kernel``)
and the bytes it must move at the HBM bandwidth (read ``h`` and ``W`` and write their
gradients: ``2 (N D + V D)`` elements):

.. math::
    t_\\mathrm{floor} = \\max\\Big(\\frac{6 N D V}{F_\\mathrm{bf16}},
    \\frac{2 (N D + V D)\\, b}{B_\\mathrm{HBM}}\\Big)

>>> from jaxent.bench import targets
>>> r = targets.roofline(targets.CHIPS["h100"], 16384, 4096, 128256)
>>> round(r.floor_s * 1e3, 1), r.bound
(52.2, 'compute')
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip, from its vendor's public specification.

    Attributes:
      name: the short name used on the command line and in tables (``"h100"``).
      platform: ``"cuda"`` or ``"tpu"``.
      description: the device kind as its runtime reports it.
      cores: programs it runs at once: streaming multiprocessors (GPU) or TensorCores
        per chip (TPU).
      bf16_flops: dense bf16 matmul rate, flop/s.
      hbm_bytes_per_s: HBM bandwidth, bytes/s.
      hbm_bytes: HBM size, bytes.
      topology: libtpu's topology name (TPU only).
      clock_ghz, smem_per_sm, smem_per_block_optin, l2_bytes, sm_major, sm_minor: the
        GPU's boost clock, shared memory per SM and per block (opt-in), L2 size and
        compute capability (GPU only).
    """

    name: str
    platform: Literal["cuda", "tpu"]
    description: str
    cores: int
    bf16_flops: float
    hbm_bytes_per_s: float
    hbm_bytes: int
    topology: str = ""
    clock_ghz: float = 0.0
    smem_per_sm: int = 0
    smem_per_block_optin: int = 0
    l2_bytes: int = 0
    sm_major: int = 0
    sm_minor: int = 0


_GIB = 1 << 30
_HOPPER = dict(platform="cuda", cores=132, bf16_flops=989.4e12, clock_ghz=1.98,
               smem_per_sm=228 * 1024, smem_per_block_optin=227 * 1024, l2_bytes=50 << 20,
               sm_major=9, sm_minor=0)

CHIPS: dict[str, Chip] = {
    # NVIDIA H100 SXM5 datasheet: 132 SMs, 989.4 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s.
    "h100": Chip("h100", description="NVIDIA H100 80GB HBM3", hbm_bytes_per_s=3.35e12,
                 hbm_bytes=80 * _GIB, **_HOPPER),  # type: ignore[arg-type]
    # NVIDIA H200 SXM: the H100's SMs with 141 GB HBM3e at 4.8 TB/s.
    "h200": Chip("h200", description="NVIDIA H200", hbm_bytes_per_s=4.8e12,
                 hbm_bytes=141 * 10**9, **_HOPPER),  # type: ignore[arg-type]
    # Google Cloud TPU docs: v5e 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, 1 TensorCore.
    "v5e": Chip("v5e", "tpu", "TPU v5 lite", 1, 197e12, 819e9, 16 * _GIB, topology="v5e:1x1"),
    # v6e (Trillium): 918 TFLOP/s bf16, 32 GB at 1640 GB/s, 1 TensorCore.
    "v6e": Chip("v6e", "tpu", "TPU v6 lite", 1, 918e12, 1640e9, 32 * _GIB, topology="v6e:1x1"),
    # v5p: 459 TFLOP/s bf16, 95 GB at 2765 GB/s, 2 TensorCores (megacore).
    "v5p": Chip("v5p", "tpu", "TPU v5", 2, 459e12, 2765e9, 95 * _GIB, topology="v5:1x1x1"),
}


def gpu_target_config(chip: Chip) -> str:
    """XLA's ``GpuTargetConfigProto`` (text format) for ``chip``, from its fields."""
    if chip.platform != "cuda":
        raise ValueError(f"`chip` must be a cuda chip, got {chip.name!r} ({chip.platform})")
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {chip.smem_per_sm}
  threads_per_core_limit: 2048
  core_count: {chip.cores}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bytes_per_s)}
  l2_cache_size: {chip.l2_bytes}
  clock_rate_ghz: {chip.clock_ghz}
  device_memory_size: {chip.hbm_bytes}
  shared_memory_per_block_optin: {chip.smem_per_block_optin}
  cuda_compute_capability {{ major: {chip.sm_major} minor: {chip.sm_minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{chip.description}"
"""


def device(chip: Chip) -> Any:
    """A compile-only device of ``chip`` (needs libtpu, or the CUDA plugin and ptxas).

    Raises ``RuntimeError`` naming the missing package when the compiler is not installed.
    """
    from jax.experimental import topologies

    try:
        if chip.platform == "tpu":
            topo = topologies.get_topology_desc(
                topology_name=chip.topology, platform="tpu", chip_config_name="default",
                chips_per_host_bounds=(1, 1, 1), num_slices=1, wrap=(False, False, False))
        else:
            topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                                target_config=gpu_target_config(chip))
    except (NotImplementedError, RuntimeError, ValueError) as e:
        need = "jax[tpu]" if chip.platform == "tpu" else "jax-cuda12-plugin, jax-cuda12-pjrt"
        raise RuntimeError(f"cannot compile for {chip.name} here ({need} needed): {e}") from e
    return topo.devices[0]


@dataclasses.dataclass(frozen=True)
class Roofline:
    """The analytic floor of one fused head's forward and backward on one chip.

    Attributes:
      flops: ``6 N D V``.
      bytes: ``2 (N D + V D)`` elements of ``itemsize`` bytes.
      floor_s: the larger of the two times.
      bound: ``"compute"`` or ``"memory"``, whichever sets the floor.
    """

    flops: float
    bytes: float
    floor_s: float
    bound: str

    def fraction(self, seconds: float) -> float:
        """The floor over a measured time (1.0: at the floor)."""
        return self.floor_s / seconds


def floor(chip: Chip, flops: float, moved: float) -> Roofline:
    """The floor of a program doing ``flops`` (at the bf16 rate) and moving ``moved`` bytes."""
    t_c, t_m = flops / chip.bf16_flops, moved / chip.hbm_bytes_per_s
    return Roofline(flops, moved, max(t_c, t_m), "compute" if t_c >= t_m else "memory")


def roofline(chip: Chip, n: int, d: int, v: int, itemsize: int = 2,
             forward_only: bool = False) -> Roofline:
    """The floor of ``[n, d] x [d, v]`` on ``chip`` (``2 N D V`` flops forward only)."""
    flops = (2.0 if forward_only else 6.0) * n * d * v
    moved = (1 if forward_only else 2) * (n * d + v * d) * itemsize
    return floor(chip, flops, moved)


def chip_of(device_kind: str) -> Chip | None:
    """The :data:`CHIPS` entry whose runtime name ``device_kind`` is (e.g. ``"NVIDIA H100
    80GB HBM3"``, ``"TPU v6 lite"``), matched on the model name; None for any other device.

    >>> chip_of("NVIDIA H100 80GB HBM3").name, chip_of("cpu")
    ('h100', None)
    """
    kind = device_kind.lower()
    for chip in CHIPS.values():
        model = chip.description.lower()
        if chip.platform == "cuda":
            model = model.split()[1]  # "h100", "h200"
        if model in kind and not (chip.name == "v5p" and "lite" in kind):
            return chip
    return None
