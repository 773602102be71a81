"""jaxent.objectives against float64 NumPy references written from the papers' formulas.

* values (f32 against float64, rtol 1e-5) and gradients (``jax.grad`` in f32 against central
  finite differences of the float64 reference) of PPO, dual-clip PPO, GRPO, DAPO, GSPO (the
  sequence-level objective of the paper, not the token form the library computes), the
  k1/k2/k3 penalties, TIS (token and sequence) and the entropy bonus, for every aggregation;
* gradient accumulation: micro-batches of unequal token counts (and lengths) with the full
  batch's normalizers give the full-batch gradient of a tiny linear policy;
* data parallelism: 8 simulated CPU devices (``shard_map``, ``axis_name``) give the same, in
  a subprocess (``python tests/test_objectives.py dp``), as the device count is fixed when JAX
  starts.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent
from jaxent import objectives

MODES = objectives.AGGREGATIONS
B, T = 6, 7


# ------------------------------------------------------------------ float64 references


def ref_aggregate(loss, mask, mode, length=None):
    """verl's agg_loss semantics, with Dr. GRPO's 1/G for the "-norm" mode."""
    m = mask.astype(np.float64)
    seq_sum = (loss * m).sum(-1)
    n_seq = max((m.sum(-1) > 0).sum(), 1)
    if mode == "token-mean":
        return seq_sum.sum() / max(m.sum(), 1)
    if mode == "seq-mean-token-sum":
        return seq_sum.sum() / n_seq
    if mode == "seq-mean-token-mean":
        return (seq_sum / np.maximum(m.sum(-1), 1)).sum() / n_seq
    return seq_sum.sum() / (n_seq * (length or loss.shape[-1]))


def ref_ppo_token(logp, old, adv, eps_low, eps_high, dual_clip):
    """Schulman et al. 2017 (eq. 7) per token; Ye et al. 2020's dual clip for A < 0."""
    r = np.exp(logp - old)
    loss = -np.minimum(r * adv, np.clip(r, 1 - eps_low, 1 + eps_high) * adv)
    if dual_clip is not None:
        loss = np.where(adv < 0, np.minimum(loss, -dual_clip * adv), loss)
    return loss


def ref_kl(logp, ref, estimator):
    """Schulman's k1, k2, k3 with rho = pi_ref / pi_theta."""
    log_rho = ref - logp
    return {"k1": -log_rho, "k2": 0.5 * log_rho**2,
            "k3": np.exp(log_rho) - 1 - log_rho}[estimator]


def ref_tis(old, beh, mask, level, cap):
    log_w = np.where(mask, old - beh, 0.0)
    if level == "sequence":
        log_w = np.broadcast_to(log_w.sum(-1, keepdims=True), log_w.shape)
    w = np.exp(log_w)
    return w if cap is None else np.minimum(w, cap)


def ref_loss(logp, entropy, d, cfg):
    """The whole objective in float64 from the formulas; ``d`` holds the constant inputs."""
    mask, adv = d["mask"], d["adv"]
    adv_tok = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, logp.shape)
    mode = cfg.get("aggregation", "token-mean")
    if cfg.get("gspo"):  # Zheng et al. 2025, eq. 5-7: one ratio and one loss per sequence
        n = mask.sum(-1)
        s = np.exp(np.where(mask, logp - d["old"], 0).sum(-1) / np.maximum(n, 1))
        lo, hi = cfg["eps_low"], cfg["eps_high"]
        per_seq = -np.minimum(s * adv, np.clip(s, 1 - lo, 1 + hi) * adv)
        return per_seq[n > 0].sum() / max((n > 0).sum(), 1)
    pg = ref_ppo_token(logp, d["old"], adv_tok, cfg.get("eps_low", 0.2),
                       cfg.get("eps_high", cfg.get("eps_low", 0.2)), cfg.get("dual_clip"))
    if "behaviour" in cfg:
        pg = pg * ref_tis(d["old"], d["beh"], mask, cfg["behaviour"], cfg.get("tis_cap", 2.0))
    tok = pg + cfg.get("kl_coef", 0.0) * ref_kl(logp, d["ref"], cfg.get("kl_estimator", "k3"))
    tok = tok - cfg.get("entropy_coef", 0.0) * entropy
    return ref_aggregate(tok, mask, mode)


def fd_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


def make_inputs(rng, shape=(B, T), spread=0.3):
    logp = np.log(rng.uniform(0.05, 0.9, shape))
    mask = rng.random(shape) < 0.75
    mask[1] = False  # a sequence with no counted token
    mask[0, -1] = True  # the last column counts somewhere
    return {
        "logp": logp,
        "old": logp + rng.normal(0, spread, shape),
        "ref": logp + rng.normal(0, spread, shape),
        "beh": logp + rng.normal(0, spread, shape),
        "entropy": rng.uniform(0.5, 3.0, shape),
        "adv": rng.normal(size=shape[:-1]),
        "adv_tok": rng.normal(size=shape),
        "mask": mask,
    }


# (name, function, options, reference config)
CASES = [
    ("ppo", objectives.ppo_loss, {}, {}),
    ("ppo-dual", objectives.ppo_loss, dict(dual_clip=1.5), dict(dual_clip=1.5)),
    ("ppo-asym", objectives.ppo_loss, dict(eps_low=0.1, eps_high=0.3),
     dict(eps_low=0.1, eps_high=0.3)),
    ("grpo", objectives.grpo_loss, dict(), dict(kl_coef=0.04, aggregation="seq-mean-token-mean")),
    ("dapo", objectives.dapo_loss, dict(), dict(eps_low=0.2, eps_high=0.28)),
    ("gspo", objectives.gspo_loss, dict(eps_low=0.1, eps_high=0.12),
     dict(gspo=True, eps_low=0.1, eps_high=0.12)),
    *[(f"kl-{e}", objectives.ppo_loss, dict(kl_coef=0.3, kl_estimator=e),
       dict(kl_coef=0.3, kl_estimator=e)) for e in ("k1", "k2", "k3")],
    ("entropy", objectives.ppo_loss, dict(entropy_coef=0.05), dict(entropy_coef=0.05)),
    ("tis-token", objectives.ppo_loss, dict(tis_level="token"), dict(behaviour="token")),
    ("tis-seq", objectives.ppo_loss, dict(tis_level="sequence", tis_cap=5.0),
     dict(behaviour="sequence", tis_cap=5.0)),
    ("is-untruncated", objectives.ppo_loss, dict(tis_cap=None),
     dict(behaviour="token", tis_cap=None)),
]


def _call(fn, opts, cfg, d, logp, entropy, adv, **kw):
    extra = dict(ref_logp=d["ref"], entropy=entropy)
    if "behaviour" in cfg:
        extra["behaviour_logp"] = d["beh"]
    return fn(logp, d["old"], adv, d["mask"], **opts, **extra, **kw)


@pytest.mark.parametrize("name,fn,opts,cfg", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("per_token", [False, True], ids=["adv-seq", "adv-token"])
def test_objective_value_and_grad(rng, name, fn, opts, cfg, per_token):
    if name == "gspo" and per_token:
        pytest.skip("the paper's GSPO has one advantage per sequence")
    d = make_inputs(rng)
    adv = d["adv_tok"] if per_token else d["adv"]
    d = {**d, "adv": adv}
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}

    def loss(logp, entropy):
        return _call(fn, opts, cfg, f32, logp, entropy, f32["adv"])[0]

    got = loss(f32["logp"], f32["entropy"])
    want = ref_loss(d["logp"], d["entropy"], d, cfg)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)
    g_logp, g_ent = jax.grad(loss, argnums=(0, 1))(f32["logp"], f32["entropy"])
    want_logp = fd_grad(lambda x: ref_loss(x, d["entropy"], d, cfg), d["logp"])
    want_ent = fd_grad(lambda x: ref_loss(d["logp"], x, d, cfg), d["entropy"])
    np.testing.assert_allclose(np.asarray(g_logp), want_logp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_ent), want_ent, rtol=1e-5, atol=1e-7)
    assert np.abs(want_logp).max() > 1e-3  # a gradient that can be wrong


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["ppo-dual", "kl-k2", "entropy", "tis-seq"])
def test_every_aggregation(rng, mode, case):
    _, fn, opts, cfg = next(c for c in CASES if c[0] == case)
    d = make_inputs(rng)
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
    cfg = {**cfg, "aggregation": mode}

    def loss(logp):
        return _call(fn, opts, cfg, f32, logp, f32["entropy"], f32["adv"],
                     aggregation=mode)[0]

    np.testing.assert_allclose(float(loss(f32["logp"])),
                               ref_loss(d["logp"], d["entropy"], d, cfg), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(jax.grad(loss)(f32["logp"])),
        fd_grad(lambda x: ref_loss(x, d["entropy"], d, cfg), d["logp"]), rtol=1e-5, atol=1e-7)


def test_kl_penalty_estimators(rng):
    d = make_inputs(rng)
    for e in ("k1", "k2", "k3"):
        got = objectives.kl_penalty(jnp.asarray(d["logp"], jnp.float32),
                                    jnp.asarray(d["ref"], jnp.float32), e)
        np.testing.assert_allclose(np.asarray(got), ref_kl(d["logp"], d["ref"], e),
                                   rtol=1e-5, atol=1e-6)
    # k1 and k3 are unbiased for KL(p || q) when tokens are drawn from p.
    p, q = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.5, 0.3])
    for e in ("k1", "k3"):
        est = objectives.kl_penalty(jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q)), e)
        np.testing.assert_allclose(float((p * np.asarray(est)).sum()),
                                   (p * np.log(p / q)).sum(), rtol=1e-5)


def test_metrics(rng):
    d = make_inputs(rng)
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
    _, m = objectives.ppo_loss(f32["logp"], f32["old"], f32["adv_tok"], f32["mask"],
                               eps_low=0.1, eps_high=0.15, dual_clip=1.3, ref_logp=f32["ref"],
                               kl_estimator="k2", entropy=f32["entropy"],
                               behaviour_logp=f32["beh"], tis_cap=1.5)
    mask, adv = d["mask"], d["adv_tok"]
    r = np.exp(d["logp"] - d["old"])

    def mean(x):
        return (x * mask).sum() / mask.sum()

    want = dict(clip_frac_low=mean((adv < 0) & (r < 0.9)),
                clip_frac_high=mean((adv > 0) & (r > 1.15)),
                clip_frac_dual=mean((adv < 0) & (r > 1.3)),
                approx_kl=mean(r - 1 - np.log(r)),
                kl=mean(ref_kl(d["logp"], d["ref"], "k2")),
                entropy=mean(d["entropy"]), ratio_mean=mean(r), ratio_max=r[mask].max(),
                is_weight_mean=mean(ref_tis(d["old"], d["beh"], mask, "token", 1.5)))
    for k, v in want.items():
        np.testing.assert_allclose(float(getattr(m, k)), v, rtol=1e-5, err_msg=k)
    assert 0 < want["clip_frac_low"] and 0 < want["clip_frac_high"]


def test_padding_and_huge_ratios_stay_finite(rng):
    d = make_inputs(rng)
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
    mask = f32["mask"]
    junk = jnp.where(mask, f32["logp"], -jnp.inf)  # padded positions hold -inf / nan
    old = jnp.where(mask, f32["old"], jnp.nan)

    def loss(lp, old):
        return objectives.grpo_loss(lp, old, f32["adv"], mask, ref_logp=f32["ref"])[0]

    clean = loss(f32["logp"], f32["old"])
    np.testing.assert_allclose(float(loss(junk, old)), float(clean), rtol=1e-6)
    g = jax.grad(loss)(junk, old)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(loss)(f32["logp"],
                                                                           f32["old"])))
    # exp(100) overflows float32; clipped tokens (A > 0) have a finite loss and no gradient.
    lp = jnp.array([[100.0, 0.0]])
    old = jnp.zeros((1, 2))
    val, grad = jax.value_and_grad(
        lambda x: objectives.ppo_loss(x, old, jnp.array([[1.0, 1.0]]))[0])(lp)
    np.testing.assert_allclose(float(val), -(1.2 + 1.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), [[0.0, -0.5]])


def test_empty_batch_is_zero():
    z = jnp.zeros((2, 3))
    loss, m = objectives.ppo_loss(z, z, jnp.ones(2), jnp.zeros((2, 3), bool))
    assert float(loss) == 0.0 and float(m.ratio_mean) == 0.0
    for mode in MODES:
        assert float(objectives.aggregate(z + 1, jnp.zeros((2, 3), bool), mode)) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(aggregation="seq-mean"), "`aggregation`"),
    (dict(eps_low=0.0), "`eps_low`"),
    (dict(eps_low=1.0), "`eps_low`"),
    (dict(eps_high=-0.1), "`eps_high`"),
    (dict(dual_clip=1.0), "`dual_clip`"),
    (dict(kl_coef=0.1), "`ref_logp`"),
    (dict(kl_coef=-1.0), "`kl_coef`"),
    (dict(entropy_coef=0.1), "`entropy`"),
    (dict(tis_cap=0.0), "`tis_cap`"),
    (dict(tis_level="batch"), "`tis_level`"),
    (dict(kl_estimator="k4"), "`kl_estimator`"),
    (dict(ratio_level="group"), "`ratio_level`"),
    (dict(max_length=0), "`max_length`"),
    (dict(old_logp=jnp.zeros((2, 4))), "`old_logp`"),
    (dict(advantages=jnp.zeros((3,))), "`advantages`"),
    (dict(mask=jnp.ones((3, 2), bool)), "`mask`"),
    (dict(ref_logp=jnp.zeros((2,))), "`ref_logp`"),
    (dict(entropy=jnp.zeros((2, 4))), "`entropy`"),
    (dict(behaviour_logp=jnp.zeros((3,))), "`behaviour_logp`"),
])
def test_bad_input(kwargs, match):
    args = dict(logp=jnp.zeros((2, 3)), old_logp=jnp.zeros((2, 3)), advantages=jnp.ones(2))
    for k in list(args):
        if k in kwargs:
            args[k] = kwargs.pop(k)
    with pytest.raises(ValueError, match=match):
        objectives.policy_loss(**args, **kwargs)


def test_bad_input_other_functions():
    with pytest.raises(ValueError, match="`estimator`"):
        objectives.kl_penalty(jnp.zeros(3), jnp.zeros(3), "k5")
    with pytest.raises(TypeError, match="`normalizers`"):
        objectives.aggregate(jnp.zeros((2, 3)), normalizers=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="`max_length`"):
        objectives.aggregate(jnp.zeros((2, 3)), max_length=4,
                             normalizers=objectives.normalizers(jnp.ones((2, 3), bool)))
    with pytest.raises(TypeError, match="`logp`"):
        objectives.ppo_loss(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match="`logp`"):
        objectives.ppo_loss(jnp.float32(0), jnp.float32(0), jnp.float32(1))
    with pytest.raises(TypeError, match="`eps_low`"):
        jax.jit(lambda e: objectives.ppo_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)),
                                              jnp.ones(1), eps_low=e)[0])(0.2)


# ------------------------------------------------------------ gradient accumulation


V, D = 11, 5


def policy_batch(rng, b=8, t=9):
    """A tiny linear policy's batch: hidden [b, t, D], tokens, constants, a ragged mask."""
    lengths = rng.integers(1, t + 1, b)
    lengths[:5] = [t, t, t, 0, 2]  # the micro-batches of 3, 2 and 3 sequences differ
    mask = np.arange(t)[None, :] < lengths[:, None]
    mask &= rng.random((b, t)) < 0.9
    return dict(h=rng.normal(size=(b, t, D)), tokens=rng.integers(0, V, (b, t)),
                old=np.log(rng.uniform(0.02, 0.3, (b, t))),
                ref=np.log(rng.uniform(0.02, 0.3, (b, t))),
                adv=rng.normal(size=b), mask=mask)


def policy_loss_of(w, batch, mode, norm, objective, axis_name=None):
    """The loss of one (micro-)batch for a linear head ``w`` [D, V]."""
    logp, ent = jaxent.token_log_probs(batch["h"] @ w, batch["tokens"], return_entropy=True)
    kw = dict(aggregation=mode, normalizers=norm, axis_name=axis_name)
    if objective == "gspo":
        return objectives.gspo_loss(logp, batch["old"], batch["adv"], batch["mask"],
                                    eps_low=0.1, eps_high=0.12, **kw)[0]
    return objectives.policy_loss(logp, batch["old"], batch["adv"], batch["mask"],
                                  eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                                  ref_logp=batch["ref"], kl_coef=0.1, entropy=ent,
                                  entropy_coef=0.01, **kw)[0]


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _micro_batches(batch, bounds, size=3):
    """Sequence ranges stacked into ``[len(bounds), size, ...]``, each padded to ``size``
    sequences with fully masked ones (their counted tokens differ)."""
    out = []
    for lo, hi in bounds:
        pad = size - (hi - lo)
        mb = {k: np.concatenate([v[lo:hi], v[lo:lo + 1].repeat(pad, 0)]) for k, v in batch.items()}
        mb["mask"][hi - lo:] = False
        out.append(mb)
    return {k: np.stack([mb[k] for mb in out]) for k in batch}


@functools.partial(jax.jit, static_argnums=(3, 4))
def _accumulate(w, batch, micro, objective, naive=True):
    """For every aggregation: the full batch's loss and gradient; the micro-batches' (one
    after another, under ``vmap``) summed, with the full batch's normalizers and (when
    ``naive``) with their own."""
    vg = jax.value_and_grad(policy_loss_of)
    norm = objectives.normalizers(batch["mask"])
    out = {}
    for mode in MODES:
        full_loss, full = vg(w, batch, mode, None, objective)
        losses, grads = jax.vmap(lambda mb, mode=mode: vg(w, mb, mode, norm, objective))(micro)
        local = full
        if naive:
            local = jax.vmap(lambda mb, mode=mode: vg(w, mb, mode, None, objective))(micro)[1]
            local = local.sum(0)
        out[mode] = full_loss, full, losses.sum(), grads.sum(0), local
    return out


@pytest.mark.parametrize("objective", ["ppo-kl-entropy", "gspo"])
def test_gradient_accumulation(rng, objective):
    """For every aggregation mode, micro-batches of 3, 2 and 3 sequences (unequal counted
    tokens), each given the full batch's normalizers: the summed losses equal the full-batch
    loss and the summed f32 gradients of the head equal the full-batch gradient to 1e-6
    (relative Frobenius norm); in float64 to 1e-12. Micro-batches that normalize by their
    own counts miss it by more than 1e-3 (the check can fail)."""
    batch = policy_batch(rng)
    bounds = [(0, 3), (3, 5), (5, 8)]
    w64 = rng.normal(size=(D, V)) / 2
    counts = [batch["mask"][lo:hi].sum() for lo, hi in bounds]
    assert len(set(counts)) == 3, counts

    def run(dtype):
        cast = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in batch.items()}
        out = _accumulate(jnp.asarray(w64, dtype), cast, _micro_batches(cast, bounds),
                          objective, dtype == np.float32)
        errors = {}
        for mode, (full_loss, full, loss_sum, summed, local) in out.items():
            np.testing.assert_allclose(float(loss_sum), float(full_loss), err_msg=mode,
                                       rtol=1e-6 if dtype == np.float32 else 1e-12)
            errors[mode] = _rel(summed, full), _rel(local, full)
        return errors

    for mode, (err32, naive) in run(np.float32).items():
        assert err32 <= 1e-6, (mode, err32)
        assert naive > 1e-3, (mode, naive)
    with jax.enable_x64(True):
        for mode, (err64, _) in run(np.float64).items():
            assert err64 <= 1e-12, (mode, err64)


def test_data_parallel_on_8_cpu_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, "dp"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count(" ok\n") == 2 * len(MODES), proc.stdout


def data_parallel_check() -> None:
    """16 sequences over 8 devices (``shard_map`` over ``"data"``): each device's loss
    uses counts summed over the axis, the psum of the devices' head gradients equals the
    one-device full-batch gradient (f32, 1e-6 relative), and the metrics are the batch's."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(v, jnp.float32) if v.dtype.kind == "f" else jnp.asarray(v)
             for k, v in policy_batch(rng, b=16).items()}
    w = jnp.asarray(rng.normal(size=(D, V)) / 2, jnp.float32)
    specs = {k: P("data") for k in batch}
    cases = [(o, m) for o in ("ppo-kl-entropy", "gspo") for m in MODES]

    @jax.jit
    def full(w, b):
        return [jax.grad(policy_loss_of)(w, b, m, None, o) for o, m in cases]

    def local(w, b):
        # w is replicated (invariant over "data"), so its gradient is already the sum over
        # the devices (shard_map transposes the implicit cast to varying into a psum); the
        # gradient of a device-varying copy of w is this device's share, to be psum'd.
        grads = [jax.grad(policy_loss_of)(w, b, m, None, o, "data") for o, m in cases]
        w_varying = jax.lax.pcast(w, "data", to="varying")
        (o, m), *_ = cases
        share = jax.grad(policy_loss_of)(w_varying, b, m, None, o, "data")
        return grads, jax.lax.psum(share, "data")

    dp = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), specs), out_specs=P()))
    wants = full(w, batch)
    gots, summed_shares = dp(w, batch)
    assert _rel(summed_shares, wants[0]) <= 1e-6, _rel(summed_shares, wants[0])
    for (objective, mode), want, got in zip(cases, wants, gots, strict=True):
        err = _rel(got, want)
        assert err <= 1e-6, (objective, mode, err)
        print(objective, mode, f"{err:.1e}", "ok")

    logp = jaxent.token_log_probs(batch["h"] @ w, batch["tokens"])
    _, want = objectives.dapo_loss(logp, batch["old"], batch["adv"], batch["mask"])
    got = jax.jit(jax.shard_map(
        lambda lp, o, a, m: objectives.dapo_loss(lp, o, a, m, axis_name="data")[1],
        mesh=mesh, in_specs=P("data"), out_specs=P()))(logp, batch["old"], batch["adv"],
                                                       batch["mask"])
    for name, a, b in zip(want._fields, got, want, strict=True):
        np.testing.assert_allclose(float(a), float(b), rtol=1e-6, err_msg=name)


if __name__ == "__main__" and sys.argv[1:] == ["dp"]:
    data_parallel_check()
