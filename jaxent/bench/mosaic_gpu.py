"""A Pallas Mosaic GPU candidate for the fused linear CE forward, compiled for an H100.

The evidence behind ``docs/gpu_strategy.md``: JAX 0.12 deprecates the Pallas Triton backend
that :mod:`jaxent.impl.pallas_gpu` is written for, and the way forward it names is Mosaic
GPU. :func:`lse_forward` is the forward's core written for Mosaic GPU: per block of
``block_n`` tokens, the row log-sum-exp of ``h @ W.T`` over the whole vocabulary, with the
logits tile formed by a warpgroup MMA (``plgpu.wgmma``) from shared memory filled by TMA
(``plgpu.emit_pipeline``, two stages), the hidden dimension streamed ``block_d`` at a time,
and an online log-sum-exp across vocabulary tiles:

.. math::
    m \\leftarrow \\max(m, \\max_j s_j), \\qquad
    l \\leftarrow l\\, e^{m_\\mathrm{old} - m} + \\sum_j e^{s_j - m}, \\qquad
    \\mathrm{lse} = m + \\log l

It is a probe, not a kernel of the library: no labels, bias, options or backward.
``python -m jaxent.bench.mosaic_gpu [N D V]`` compiles it deviceless for the H100 target of
:mod:`jaxent.bench.targets` (needs jax >= 0.12 with the CUDA plugin: the ``compile`` extra's
packages at that version); set ``MOSAIC_GPU_DUMP_PTXAS=1`` before Python starts for ptxas's
registers and spills. Its numbers are not checked here: jax 0.12's Mosaic GPU interpreter
has no CPU rule for ``wgmma``, so the first check is on a GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def lse_forward(h: jax.Array, w: jax.Array, block_n: int = 128, block_v: int = 128,
                block_d: int = 64) -> jax.Array:
    """``logsumexp(h @ w.T, axis=1)`` in float32: ``h [N, D]``, ``w [V, D]`` (bf16), every
    dimension a multiple of its block. Needs jax >= 0.12 (``plgpu.kernel``)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n, d = h.shape
    v = w.shape[0]
    nk = d // block_d

    def kernel(h_ref, w_ref, out_ref, out_smem):
        row = lax.axis_index("n") * block_n

        def body(idx, h_smem, w_smem, carry):
            acc, m_i, l_i = carry

            def mm(acc_ref):
                plgpu.wgmma(acc_ref, h_smem, w_smem.transpose((1, 0)))

            acc = pl.run_state(mm)(plgpu.ACC.init(acc))
            last = idx[1] == nk - 1  # the logits tile is complete after the last D block
            row_last = lax.broadcast_in_dim(last, (block_n,), ())
            m_new = jnp.where(row_last, jnp.maximum(m_i, acc.max(axis=1)), m_i)
            p = jnp.exp(acc - lax.broadcast_in_dim(m_new, acc.shape, [0])).sum(axis=1)
            l_i = jnp.where(row_last, l_i * jnp.exp(m_i - m_new) + p, l_i)
            acc = acc * (1.0 - lax.broadcast_in_dim(last.astype(jnp.float32), acc.shape, ()))
            return acc, m_new, l_i

        init = (jnp.zeros((block_n, block_v), jnp.float32),
                jnp.full((block_n,), -jnp.inf, jnp.float32), jnp.zeros((block_n,), jnp.float32))
        _, m, l_sum = plgpu.emit_pipeline(
            body, grid=(v // block_v, nk), max_concurrent_steps=2,
            in_specs=[plgpu.BlockSpec((block_n, block_d), lambda j, k: (0, k)),
                      plgpu.BlockSpec((block_v, block_d), lambda j, k: (j, k))],
            init_carry=init)(h_ref.at[pl.ds(row, block_n)], w_ref)
        out_smem[...] = m + jnp.log(l_sum)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_ref.at[pl.ds(row, block_n)])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        kernel, grid=(n // block_n,), grid_names=("n",),
        out_type=jax.ShapeDtypeStruct((n,), jnp.float32),
        scratch_types=(plgpu.SMEM((block_n,), jnp.float32),),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(h, w)


def compile_for_h100(n: int, d: int, v: int) -> str:
    """Compile :func:`lse_forward` at ``[n, d] x [v, d]`` bf16 for the H100, with no device;
    returns the custom calls of the compiled program (``"mosaic_gpu_v2"`` when it worked)."""
    from jaxent.bench import compiled, targets

    compiled.configure()
    dev = targets.device(targets.CHIPS["h100"])
    sh = jax.sharding.SingleDeviceSharding(dev)
    args = [jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=sh),
            jax.ShapeDtypeStruct((v, d), jnp.bfloat16, sharding=sh)]
    with jax.default_device(dev):
        text = jax.jit(lse_forward).lower(*args).compile().as_text() or ""
    calls = [line.split('custom_call_target="')[1].split('"')[0]
             for line in text.splitlines() if 'custom_call_target="' in line]
    return ", ".join(calls)


def main(argv: Sequence[str] | None = None) -> None:
    n, d, v = (int(a) for a in (argv or sys.argv[1:] or ("16384", "4096", "128256")))
    print(f"Mosaic GPU lse_forward {n}x{d}x{v} bf16 for h100: {compile_for_h100(n, d, v)}")


if __name__ == "__main__":
    main()
