"""The conformance suite of the fused heads (tests/test_conformance_heads.py) over placements,
on 8 simulated CPU devices.

Run by tests/test_sharded.py in a subprocess of its own. Each case places the student's and
the teacher's hidden states, kernels and biases on a 2 x 4 ``data x model`` mesh and runs
one program holding every head of the suite (log-probs with and without the entropy, soft
targets, forward KL, reverse KL, JSD, top-k, sparse teacher) on both vocabularies (128, a
whole number of blocks; 100, ragged against every block and 25 classes per shard), values
and gradients against the naive materialized program, at the suite's tolerances:

* ``explicit-data``: Explicit axes, tokens split over ``data``, the kernel replicated;
* ``explicit-vocab``: Explicit axes, tokens over ``data``, the vocabulary over ``model``;
* ``auto-vocab``: the same split on Auto axes (the partitioner places the walk).

The (placement, impl, dtype) cases cover each pair of placement and impl the placement
serves, and every impl in both dtypes; the pairs it does not serve raise a ``ValueError``
naming ``impl``.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from tests import test_conformance_heads as conf  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

# placement -> (axis type, hidden's spec, kernel's spec ("dv"), bias's spec)
PLACEMENTS = {
    "explicit-data": (AxisType.Explicit, P("data", None), P(), P()),
    "explicit-vocab": (AxisType.Explicit, P("data", None), P(None, "model"), P("model")),
    "auto-vocab": (AxisType.Auto, P("data", None), P(None, "model"), P("model")),
}
CASES = [("explicit-data", "vocab", "float32"), ("explicit-data", "token", "bfloat16"),
         ("explicit-data", "pallas", "float32"), ("explicit-vocab", "vocab", "bfloat16"),
         ("auto-vocab", "vocab", "float32"), ("auto-vocab", "token", "bfloat16")]
REFUSED = [("explicit-vocab", "token"), ("explicit-vocab", "pallas"), ("auto-vocab", "pallas")]


def _mesh(placement: str):
    axis_type = PLACEMENTS[placement][0]
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def _placed(placement: str, d: dict) -> dict:
    """``d`` with the students' and teachers' hidden states, kernels and biases placed."""
    _, hs, ks, bs = PLACEMENTS[placement]
    mesh = _mesh(placement)
    spec = {"h": hs, "ht": hs, "w": ks, "wt": ks, "b": bs, "bt": bs}
    return {k: jax.device_put(a, NamedSharding(mesh, spec[k])) if k in spec else a
            for k, a in d.items()}


@functools.cache
def _results(placement: str, impl: str, dtype: str) -> dict:
    data = {k: conf._data(v, dtype) for k, v in conf.VOCABS.items()}
    with jax.set_mesh(_mesh(placement)):
        placed = {k: _placed(placement, d) for k, d in data.items()}
        return jax.jit(functools.partial(conf._everything, conf._head, impl))(placed)


@pytest.mark.parametrize("vocab", list(conf.VOCABS))
@pytest.mark.parametrize("head", conf.HEADS)
@pytest.mark.parametrize(("placement", "impl", "dtype"), CASES)
def test_placed_head_matches_naive_program(placement, impl, dtype, head, vocab):
    outs, grads = _results(placement, impl, dtype)[head, vocab]
    ref_outs, ref_grads = conf._compiled(None, dtype)[1][head, vocab]
    tol_v, tol_g = conf.TOL[dtype]
    for i, (o, r) in enumerate(zip(outs, ref_outs, strict=True)):
        if jax.numpy.issubdtype(r.dtype, jax.numpy.integer):  # the top-k ids
            assert (jax.device_get(o) == jax.device_get(r)).all(), f"output {i}"
            continue
        conf._close(o, r, tol_v, f"output {i}")
    for name, g, r in zip(("hidden", "kernel", "bias"), grads, ref_grads, strict=True):
        assert g.dtype == jax.numpy.dtype(dtype), name
        conf._close(g, r, tol_g, f"d {name}")


@pytest.mark.parametrize(("placement", "impl"), REFUSED)
@pytest.mark.parametrize("head", ["log_probs", "soft", "kl", "topk", "sparse"])
def test_unserved_placement_is_a_clear_error(placement, impl, head):
    d = conf._data(conf.VOCABS["whole"], "float32")
    with jax.set_mesh(_mesh(placement)):
        p = _placed(placement, d)
        with pytest.raises(ValueError, match=f"`impl`='{impl}' cannot serve"):
            jax.jit(lambda h, w, b: conf._head(head, impl, h, w, b, d))(p["h"], p["w"], p["b"])
