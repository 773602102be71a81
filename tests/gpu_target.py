"""Lowering the Triton kernels for ``cuda`` on a host with no GPU.

From jax 0.12 the Pallas Triton lowering asks which GPU it compiles for
(``jax._src.pallas.triton.gpu_info.get_gpu_info``): on a host with no GPU it raises "No
supported GPU devices found, please specify an abstract GPU device using AbstractDevice"
unless an abstract mesh names one, through JAX's public ``jax.sharding.use_abstract_mesh``.
Earlier releases lowered without asking. :func:`cuda_target` is that context (a no-op
before 0.12); ``docs/gpu_strategy.md`` shows it to users exporting for ``cuda``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

H100 = "NVIDIA H100 80GB HBM3"
ASKS_FOR_A_GPU = jax.__version_info__ >= (0, 12)


@contextlib.contextmanager
def cuda_target(device_kind: str = H100, cores: int = 132) -> Iterator[None]:
    """Lower (export) for an NVIDIA GPU of ``device_kind`` from any host."""
    if not ASKS_FOR_A_GPU:
        yield
        return
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    mesh = AbstractMesh((1,), ("_gpu",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind, cores, "cuda"))
    with use_abstract_mesh(mesh):
        yield
