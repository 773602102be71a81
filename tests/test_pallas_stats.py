"""The statistic kernels (:mod:`jaxent.impl.pallas_stats`) on both backends in Pallas's
interpreter (the fused cross-entropy's statistic among them), against the vocabulary walk
(:func:`jaxent.impl.stream.run`, itself checked against the naive program in
``test_conformance_heads``), with the options the public heads' conformance cases leave
out: a soft-cap, class weights and z-loss, the targets' gradient, the ``"vd"`` layout, the
GPU backward's chunks, padding columns (``num_classes`` below the kernel's columns), a
counted token outside the vocabulary (``nan``), the GPU forward's vocabulary split (with
ties of the argmax across its ranges); and the registry's refusals."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent
from jaxent import _heads
from jaxent import _rowmath as rm
from jaxent._options import Options
from jaxent.impl import (
    pallas_gpu,
    pallas_stats,
    pallas_stats_gpu,
    pallas_stats_tpu,
    pallas_tpu,
    stats,
    stats_aux,
    stream,
    topk,
)
from jaxent.impl.plan import stream_plan

N, D, DT, V, COLS = 37, 24, 16, 150, 160  # 10 padding columns beyond V
SPLIT = pallas_gpu.Config(block_n=16, block_v=32, block_k=16, v_split=4)
BACKENDS = {
    "gpu": (pallas_stats_gpu, pallas_gpu.Config(block_n=16, block_v=64, block_k=16)),
    # Logits gradients streamed in chunks of two tiles' rows or columns: the backward's
    # chunk loops, each with a last chunk that starts early and overlaps the one before.
    "gpu-chunks": (pallas_stats_gpu, pallas_gpu.Config(block_n=16, block_v=64, block_k=16,
                                                       chunk=2 * 16 * 192)),
    "tpu": (pallas_stats_tpu, pallas_tpu.Config(block_n=128, block_v=128)),
    # The forward's vocabulary split: 5 tiles in 4 ranges of 2, 2, 1 (with the padding
    # columns) and 0 tiles, merged by each statistic's merge.
    "gpu-split": (pallas_stats_gpu, SPLIT),
}
OPTS = Options(label_smoothing=0.1, z_loss=1e-3, logit_softcap=4.0)


def _data():
    rng = np.random.default_rng(7)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    y = rng.integers(0, V, N).astype(np.int32)
    y[3] = V + 2  # counted and outside the vocabulary: nan
    return {"h": f(N, D), "w": f(COLS, D) / 3, "b": f(COLS) / 2, "ht": f(N, DT),
            "wt": f(COLS, DT) / 3, "y": jnp.asarray(y),
            "t": jax.nn.softmax(f(N, COLS) * 2).at[:, V:].set(0.0),
            "weight": jnp.asarray(rng.uniform(0.5, 2.0, COLS), jnp.float32),
            "counted": jnp.asarray(rng.random(N) < 0.8).at[3].set(True),
            "temp": jnp.asarray(rng.uniform(0.6, 1.8, N), jnp.float32),
            "c": f(3, N)}


CASES = {  # statistic, streams, rows, cols; layout "vd"
    "log_probs": lambda d, h, w, b, t: (
        stats.LogProbs(V, True), ((h, w, b),), stats.Rows(d["y"], d["counted"], d["temp"]),
        {}),
    "soft": lambda d, h, w, b, t: (
        stats.SoftTargets(V), ((h, w, b),), stats.Rows(None, d["counted"]),
        {"targets": t, "weight": d["weight"]}),
    # Row 3 ignored here (an out-of-range label's nan would reach every d W entry).
    "ce": lambda d, h, w, b, t: (
        stats.CrossEntropy(V, True), ((h, w, b),),
        rm.labels_info(d["y"].at[3].set(-100), V, -100, d["counted"], d["weight"],
                       jnp.float32, d["temp"]),
        {"weight": d["weight"]}),
    "jsd": lambda d, h, w, b, t: (
        stats.Distill("jsd", 0.3), ((h, w, b), (d["ht"], d["wt"], None)),
        stats.Rows(None, d["counted"], d["temp"]), {}),
}


def _all(run, cases=CASES, data=None):
    """``{case: (outputs, grads w.r.t. h, W, b, targets)}`` of ``run(stat, streams, rows,
    cols)`` for every case, in one program."""
    def one(d):
        out = {}
        for name, case in cases.items():
            def loss(h, w, b, t, case=case):
                stat, streams, rows, cols = case(d, h, w, b, t)
                outs = jax.tree.leaves(run(stat, streams, rows, cols))
                total = sum(jnp.sum(jnp.where(jnp.isnan(o), 0.0, o) * d["c"][i])
                            for i, o in enumerate(outs))
                return total, outs

            (_, outs), grads = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(
                d["h"], d["w"], d["b"], d["t"])
            out[name] = (outs, grads)
        return out

    return jax.jit(one)(_data() if data is None else data)


def _walk(stat, streams, rows, cols):
    plan = stream_plan(OPTS, V, COLS, N, layout="vd", block_size=64)
    return stream.run(stat, plan, streams, rows, cols)


def _kernels(mod, cfg):
    return lambda stat, s, r, c: pallas_stats.run_on(mod, cfg, stat, OPTS, V, "vd", s, r, c,
                                                     interpret=True)


def _check(got, ref):
    for name in ref:
        (outs, grads), (ref_outs, ref_grads) = got[name], ref[name]
        for o, r in zip(outs, ref_outs, strict=True):
            np.testing.assert_array_equal(np.isnan(o), np.isnan(r))
            np.testing.assert_allclose(o, r, rtol=2e-5, atol=2e-5 * np.nanmax(np.abs(r)),
                                       err_msg=name)
        for what, g, r in zip(("h", "W", "b", "targets"), grads, ref_grads, strict=True):
            np.testing.assert_array_equal(np.isnan(g), np.isnan(r))
            np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5 * np.nanmax(np.abs(r)) + 1e-30,
                                       err_msg=f"{name}: d {what}")


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_kernels_match_the_vocabulary_walk(backend):
    got = _all(_kernels(*BACKENDS[backend]))
    _check(got, _all(_walk))
    assert np.isnan(got["log_probs"][0][0][3])  # the counted token outside the vocabulary


AUX_CASES = {  # the argmax statistics and the one-pass divergences, per-row temperatures
    "log_probs_aux": lambda d, h, w, b, t: (
        stats_aux.LogProbsAux(V, True), ((h, w, b),),
        stats.Rows(d["y"], d["counted"], d["temp"]), {}),
    "soft_aux": lambda d, h, w, b, t: (
        stats_aux.SoftTargetsAux(V), ((h, w, b),), stats.Rows(None, d["counted"], d["temp"]),
        {"targets": t}),
    **{kind: lambda d, h, w, b, t, kind=kind: (
        stats_aux.DistillAux(kind), ((h, w, b), (d["ht"], d["wt"], None)),
        stats.Rows(None, d["counted"], d["temp"]), {}) for kind in ("kl", "reverse_kl")},
}


def _tied_data():
    """:func:`_data` with the row max of most rows tied across the split's ranges, exactly
    (sums of zeros: any order of the dot products): the student's classes 5, 100 and 140
    (ranges 0, 1 and 2) and the teacher's 7 and 130 weigh only the first hidden feature,
    which every row leans to."""
    d = _data()
    d["h"] = d["h"].at[:, 0].add(3.0)
    d["ht"] = d["ht"].at[:, 0].add(3.0)
    for j in (5, 100, 140):
        d["w"] = d["w"].at[j].set(jnp.zeros(D).at[0].set(4.0))
        d["b"] = d["b"].at[j].set(0.5)
    for j in (7, 130):
        d["wt"] = d["wt"].at[j].set(jnp.zeros(DT).at[0].set(4.0))
    return d


def test_split_vocabulary_aux_and_argmax_ties():
    d = _tied_data()
    got = _all(_kernels(*BACKENDS["gpu-split"]), AUX_CASES, d)
    ref = _all(_walk, AUX_CASES, d)
    _check(got, ref)
    x = (np.asarray(d["h"], np.float64) @ np.asarray(d["w"], np.float64).T
         + np.asarray(d["b"], np.float64)[None, :])[:, :V]
    xt = (np.asarray(d["ht"], np.float64) @ np.asarray(d["wt"], np.float64).T)[:, :V]
    arg, arg_t = got["kl"][0][2], got["kl"][0][3]
    np.testing.assert_array_equal(got["log_probs_aux"][0][3], np.argmax(x, axis=1))
    np.testing.assert_array_equal(arg, np.argmax(x, axis=1))
    np.testing.assert_array_equal(arg_t, np.argmax(xt, axis=1))
    assert (np.asarray(arg) == 5).sum() > N // 2  # ties: the smallest id
    assert (np.asarray(arg_t) == 7).sum() > N // 2


def test_statistics_that_cannot_merge_walk_whole_rows():
    d = _data()
    stat = topk.TopK(4, tail=True)
    run = _kernels(*BACKENDS["gpu-split"])
    got = jax.jit(lambda: run(stat, ((d["h"], d["w"], d["b"]),),
                              stats.Rows(None, d["counted"], d["temp"]), {}))()
    ref = _walk(stat, ((d["h"], d["w"], d["b"]),), stats.Rows(None, d["counted"], d["temp"]),
                {})
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[2], ref[2], rtol=2e-5, atol=2e-5)


def test_registry_refusals_and_auto():
    d = _data()
    plan = stream_plan(Options(), V, COLS, N, layout="vd")
    args = (stats.LogProbs(V), dataclasses.replace(plan, vocab_axis="model"),
            ((d["h"], d["w"], None),), stats.Rows(d["y"], d["counted"]), {})
    with pytest.raises(ValueError, match="`impl`='pallas' cannot serve.*vocabulary shards"):
        _heads.walk("pallas", *args)
    with pytest.raises(ValueError, match="`impl`='token' cannot serve.*whole vocabulary rows"):
        _heads.walk("token", *args)
    # auto (and xla) keep the vocabulary walk on the CPU: the same program as "vocab"
    def program(impl):
        return str(jax.make_jaxpr(lambda h: _heads.walk(
            impl, args[0], plan, ((h, d["w"], None),), *args[3:]))(d["h"]))

    assert program("auto") == program("vocab") == program("xla")


def test_second_order_is_a_clear_error():
    h = jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)
    k = jnp.cos(jnp.arange(80.0)).reshape(8, 10)

    def f(h):
        return jaxent.linear_log_probs(h, k, jnp.array([0, 3, 9, 4]), impl="pallas",
                                       interpret=True).sum()

    with pytest.raises(NotImplementedError, match="second-order derivatives"):
        jax.hessian(f)(h)
