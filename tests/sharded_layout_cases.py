"""Shardings real models use, on 8 simulated CPU devices (run by tests/test_sharded.py).

* FSDP: the kernel sharded along ``D`` over the ``fsdp`` axis (which also splits the
  tokens) and along the vocabulary over ``model``;
* tokens sharded over two mesh axes, ``("data", "fsdp")``, with the kernel's vocabulary over
  ``model`` (replicated or FSDP-sharded along ``D``);
* a vocabulary the model axis does not divide (GPT-2's 50257 classes; here 1001 over 4):
  held padded to a multiple of the axis (JAX places only evenly divided shardings) and
  masked on the shards that hold the padding (``vocab_size=``), or padded inside.

Each is checked for values and gradients against the one-device loss on unplaced arrays
(dense logits), and its compiled program for the absence of any all-gather with a
vocabulary-sized dimension (the FSDP layouts gather only the kernel's ``D`` shards, the
usual FSDP parameter gather, ``[D, V/k]``). The padded vocabulary's per-device temporary
memory stays within 1.2x of the divisible vocabulary's.

Needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts:
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest
tests/sharded_layout_cases.py``.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxent  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_"
    "device_count=8 before JAX starts (tests/test_sharded.py does this)")

N, D, V = 32, 16, 64
OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-3}
# name: (mesh shape, mesh axes, hidden/labels token spec entry, kernel spec [D, V])
LAYOUTS = {
    "fsdp": ((2, 4), ("fsdp", "model"), "fsdp", ("fsdp", "model")),
    "tokens-data-fsdp": ((2, 2, 2), ("data", "fsdp", "model"), ("data", "fsdp"),
                         (None, "model")),
    "tokens-data-fsdp-kernel-fsdp": ((2, 2, 2), ("data", "fsdp", "model"), ("data", "fsdp"),
                                     ("fsdp", "model")),
}


def _mesh(name, axis_type):
    shape, names, _, _ = LAYOUTS[name]
    return jax.make_mesh(shape, names, axis_types=(getattr(AxisType, axis_type),) * len(names))


def _draw(rng, v=V, n=N, d=D):
    h = rng.normal(size=(n, d)).astype(np.float32)
    k = (rng.normal(size=(d, v)) / 2).astype(np.float32)
    b = rng.normal(size=(v,)).astype(np.float32)
    y = rng.integers(0, v, size=(n,)).astype(np.int32)
    y[rng.choice(n, size=3, replace=False)] = -100
    y[0] = v - 1  # the last class (on the last shard, next to any padding)
    return h, k, b, y


def _close(got, want, rtol=2e-5, atol=5e-6):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


def _reference(h, k, b, y, cot, **opts):
    """Value and gradients (hidden, kernel, bias) on one device: dense logits, the mean
    plus a ``cot``-weighted sum of the per-token losses."""
    def f(h, k, b):
        x = h @ k + b[None, :]
        return (jaxent.cross_entropy(x, y, **opts)
                + jnp.sum(cot * jaxent.cross_entropy(x, y, reduction="none", **opts)))

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, k, b)


def _mixed(loss):
    """``loss(h, k, b, y, reduction=...)`` as the scalar of :func:`_reference`."""
    def f(h, k, b, y, cot):
        return loss(h, k, b, y, reduction="mean") + jnp.sum(
            cot * loss(h, k, b, y, reduction="none"))

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


def _all_gathers(text: str) -> list[tuple[int, ...]]:
    """Result shapes of the all-gathers in an HLO module's text."""
    shapes = []
    for line in text.splitlines():
        m = re.search(r"=\s*\(?(\w+)\[([\d,]*)\][^=]*\ball-gather(-start)?\(", line)
        if m:
            shapes.append(tuple(int(s) for s in m.group(2).split(",") if s))
    return shapes


# ---------------------------------------------------------- FSDP and two-axis tokens


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_device(rng, layout, axis_type):
    """The shard_map API and plain jit of the fused loss, on the layout's placed inputs:
    values and gradients of the one-device loss. On Explicit axes the gradients come back
    sharded like the inputs (their types say so; the FSDP kernel's along D and V); on Auto
    axes the partitioner picks the layout of unconstrained outputs (not checked)."""
    _, _, tok, kspec = LAYOUTS[layout]
    mesh = _mesh(layout, axis_type)
    h, k, b, y = _draw(rng)
    cot = rng.normal(size=(N,)).astype(np.float32)
    want = _reference(h, k, b, y, cot, **OPTIONS)
    place = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))  # noqa: E731
    args = (place(h, tok), place(k, *kspec), place(b, "model"), place(y, tok), place(cot, tok))

    def api(h, k, b, y, **kw):
        return jaxent.sharded.shard_linear_cross_entropy(
            h, k, y, bias=b, mesh=mesh, vocab_axis="model", token_axis=tok, block_size=8,
            **OPTIONS, **kw)

    def plain(h, k, b, y, **kw):
        return jaxent.linear_cross_entropy(h, k, y, bias=b, block_size=8, **OPTIONS, **kw)

    for name, loss in (("api", api), ("plain", plain)):
        with jax.set_mesh(mesh):
            got = _mixed(loss)(*args)
        _close(got, want)
        if axis_type == "Auto":
            continue
        for g, a in zip(got[1], args, strict=False):
            assert g.sharding.is_equivalent_to(a.sharding, a.ndim), (name, g.sharding,
                                                                     a.sharding)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_hlo_gathers_nothing_vocabulary_sized(layout, axis_type):
    """The compiled value and gradients gather no array with a dimension of the full
    vocabulary (no logits, no kernel): the only all-gather allowed is the FSDP one of the
    kernel's D shards, whose result is one device's vocabulary block ``[D, V/k]``. No
    all-to-all either: ``hidden``'s gradient comes out sharded like ``hidden`` (on Auto axes
    too, where the partitioner picks its layout), never along its width (from which the
    partitioner reshards it by an all-to-all, or by gathering the whole ``[N, D]``). The
    statistic walk (log-probs) as well as the CE."""
    n, d, v = 64, 32, 1024
    shape, names, tok, kspec = LAYOUTS[layout]
    mesh = _mesh(layout, axis_type)
    k_model = mesh.shape["model"]
    sh = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    h = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=sh(tok))
    k = jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=sh(*kspec))
    y = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sh(tok))
    losses = {
        "api": lambda h, k, y: jaxent.sharded.shard_linear_cross_entropy(
            h, k, y, mesh=mesh, token_axis=tok, **OPTIONS),
        "plain": lambda h, k, y: jaxent.linear_cross_entropy(h, k, y, **OPTIONS),
        "log_probs": lambda h, k, y: jnp.sum(jaxent.linear_log_probs(h, k, y)),
    }
    allowed = {(d, v // k_model)} if kspec[0] == "fsdp" else set()
    for name, loss in losses.items():
        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, k, y).compile()
        text = compiled.as_text()
        gathers = _all_gathers(text)
        assert set(gathers) <= allowed, (name, gathers)
        assert all(v not in g for g in gathers), (name, gathers)
        assert "all-to-all" not in text, name
        dh = compiled.output_shardings[1][0]
        assert dh.is_equivalent_to(h.sharding, 2), (name, dh, h.sharding)


# ------------------------------------------------------------------ padded vocabulary

V_REAL, V_PAD = 1001, 1004  # 1001 classes over 4 shards: 251 columns each, 3 of padding


def _padded_inputs(rng):
    """A kernel and bias of ``V_PAD`` columns whose padding holds junk (large values), the
    labels over the ``V_REAL`` real classes, and the real columns (for the reference)."""
    h, k, b, y = _draw(rng, v=V_PAD)
    k[:, V_REAL:] = 1e3 * rng.normal(size=(D, V_PAD - V_REAL))
    b[V_REAL:] = 1e4
    y = np.where(y >= V_REAL, V_REAL - 1, y).astype(np.int32)
    return h, k, b, y


PADDED_OPTIONS = {
    "smoothing-zloss": OPTIONS,
    "softcap-temperature-weight": {"logit_softcap": 3.0, "temperature": 0.7,
                                   "label_smoothing": 0.2, "weight": True},
    "where-ignore-class": {"where": True, "ignore_index": 5},
}


@pytest.mark.parametrize("kernel_layout", ["dv", "vd"])
@pytest.mark.parametrize("opt_name", list(PADDED_OPTIONS))
def test_padded_vocabulary_matches_one_device(rng, opt_name, kernel_layout):
    """``shard_linear_cross_entropy(..., vocab_size=1001)`` on a kernel padded to 1004
    columns over 4 model shards (the last shard's 3 padding columns hold junk): values and
    gradients of the one-device loss on the 1001 real columns, zero gradient on the
    padding; blocks of 40 columns (the last one shifted back over repeated columns)."""
    mesh = _mesh("fsdp", "Explicit")  # (2, 4): tokens over the first axis, V over model
    h, k, b, y = _padded_inputs(rng)
    opts = {n: a for n, a in PADDED_OPTIONS[opt_name].items() if n not in ("weight", "where")}
    if PADDED_OPTIONS[opt_name].get("weight"):
        opts["weight"] = jnp.asarray(rng.uniform(0.5, 2.0, size=V_REAL), jnp.float32)
    if PADDED_OPTIONS[opt_name].get("where"):
        opts["where"] = jnp.asarray(rng.random(size=N) > 0.3)
    cot = rng.normal(size=(N,)).astype(np.float32)
    want = _reference(h, k[:, :V_REAL], b[:V_REAL], y, cot, **opts)
    kk = k if kernel_layout == "dv" else k.T.copy()

    def loss(h, k, b, y, **kw):
        return jaxent.sharded.shard_linear_cross_entropy(
            h, k, y, bias=b, mesh=mesh, vocab_axis="model", token_axis="fsdp",
            vocab_size=V_REAL, kernel_layout=kernel_layout, block_size=40, **opts, **kw)

    value, (dh, dk, db) = _mixed(loss)(h, kk, b, y, cot)
    dk = np.asarray(dk) if kernel_layout == "dv" else np.asarray(dk).T
    _close((value, dh, dk[:, :V_REAL], np.asarray(db)[:V_REAL]), want)
    assert not np.asarray(dk[:, V_REAL:]).any() and not np.asarray(db)[V_REAL:].any()


@pytest.mark.parametrize("vocab_size", [700, 760])
def test_padding_wider_than_blocks_and_shards(rng, vocab_size):
    """1004 columns over 4 shards of 251 holding 700 classes (the last shard all padding, the
    third partly) or 760 (244 of each shard's 251 columns walked masked): with 40-column
    blocks the masked columns span several blocks. One-device values and gradients, zero
    gradients on the padding."""
    mesh = _mesh("fsdp", "Explicit")
    h, k, b, y = _draw(rng, v=V_PAD)
    k[:, vocab_size:] = 1e3 * rng.normal(size=(D, V_PAD - vocab_size))
    b[vocab_size:] = 1e4
    y = (y % vocab_size).astype(np.int32)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3,
            "weight": jnp.asarray(rng.uniform(0.5, 2.0, size=vocab_size), jnp.float32)}
    cot = rng.normal(size=(N,)).astype(np.float32)
    want = _reference(h, k[:, :vocab_size], b[:vocab_size], y, cot, **opts)

    def loss(h, k, b, y, **kw):
        return jaxent.sharded.shard_linear_cross_entropy(
            h, k, y, bias=b, mesh=mesh, token_axis="fsdp", vocab_size=vocab_size,
            block_size=40, **opts, **kw)

    value, (dh, dk, db) = _mixed(loss)(h, k, b, y, cot)
    dk, db = np.asarray(dk), np.asarray(db)
    _close((value, dh, dk[:, :vocab_size], db[:vocab_size]), want)
    assert not dk[:, vocab_size:].any() and not db[vocab_size:].any()


def test_padded_vocabulary_inside_shard_map_with_aux(rng):
    """The per-shard function in the user's shard_map, ``vocab_size=1001`` of 1004 columns:
    loss, lse, z-loss, argmax (never a padding column, though the padding's logits are the
    largest) and accuracy equal the one-device function's on the real columns."""
    mesh = _mesh("fsdp", "Auto")
    h, k, b, y = _padded_inputs(rng)
    h = np.abs(h)
    k[:, V_REAL:] = 50.0  # padding logits far above every real one

    def per_shard(h, k, y):
        return jaxent.sharded.linear_cross_entropy(
            h, k, y, axis_name="model", token_axis_name="fsdp", vocab_size=V_REAL,
            return_aux=True, block_size=64, **OPTIONS)

    rows = P("fsdp")
    out_specs = (P(), {"lse": rows, "z_loss": rows, "argmax": rows, "accuracy": P()})
    got = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(rows, P(None, "model"), rows),
                                out_specs=out_specs))(h, k, y)
    want = jaxent.linear_cross_entropy(h, k[:, :V_REAL], y, return_aux=True, **OPTIONS)
    assert int(np.max(np.asarray(got[1]["argmax"]))) < V_REAL
    _close(got, want)


def test_unpadded_uneven_vocabulary_is_padded_inside(rng):
    """A kernel of 1001 columns (JAX cannot shard that over 4: it comes replicated) goes
    through ``shard_linear_cross_entropy`` padded inside, vocabulary-parallel: values and
    gradients (shaped like the inputs) of the one-device loss."""
    mesh = _mesh("fsdp", "Explicit")
    h, k, b, y = _draw(rng, v=V_REAL)
    cot = rng.normal(size=(N,)).astype(np.float32)
    want = _reference(h, k, b, y, cot, **OPTIONS)

    def loss(h, k, b, y, **kw):
        return jaxent.sharded.shard_linear_cross_entropy(
            h, k, y, bias=b, mesh=mesh, token_axis="fsdp", block_size=32, **OPTIONS, **kw)

    got = _mixed(loss)(h, k, b, y, cot)
    assert got[1][1].shape == (D, V_REAL)
    _close(got, want)


def test_padded_vocabulary_errors():
    """``vocab_size`` larger than the kernel's columns, and a padded kernel the vocabulary
    axis does not divide, are ValueErrors naming the argument."""
    mesh = _mesh("fsdp", "Explicit")
    h, y = jnp.zeros((N, D)), jnp.zeros((N,), jnp.int32)
    with pytest.raises(ValueError, match="`vocab_size` \\(1005\\) must be at most"):
        jaxent.sharded.shard_linear_cross_entropy(h, jnp.zeros((D, V_PAD)), y, mesh=mesh,
                                                  vocab_size=1005)
    with pytest.raises(ValueError, match="padded vocabulary"):
        jaxent.sharded.shard_linear_cross_entropy(h, jnp.zeros((D, 1003)), y, mesh=mesh,
                                                  vocab_size=1001)
    with pytest.raises(ValueError, match="`labels` must be class indices in \\[0, 1001\\)"):
        jaxent.sharded.shard_linear_cross_entropy(h, jnp.zeros((D, V_PAD)), y.at[3].set(1002),
                                                  mesh=mesh, vocab_size=V_REAL)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_padded_vocabulary_hlo_and_temp_memory(axis_type):
    """GPT-2's vocabulary on 8 model shards: 50257 classes held as 50264 columns. The
    compiled value and gradients gather nothing, and the per-device temporaries are within
    1.2x of a divisible vocabulary of 50264 classes (the same shapes, no mask)."""
    n, d, v_real, v_pad = 2048, 256, 50257, 50264
    mesh = jax.make_mesh((8,), ("model",), axis_types=(getattr(AxisType, axis_type),))
    sh = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    h = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=sh())
    k = jax.ShapeDtypeStruct((d, v_pad), jnp.float32, sharding=sh(None, "model"))
    y = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sh())
    for opts in ({"z_loss": 1e-3, "logit_softcap": 5.0}, OPTIONS, {}):
        temp = {}
        for vocab_size in (None, v_real):
            fn = jax.jit(jax.value_and_grad(lambda h, k, y, vocab_size=vocab_size, opts=opts:
                                            jaxent.sharded.shard_linear_cross_entropy(
                                                h, k, y, mesh=mesh, vocab_size=vocab_size,
                                                **opts), argnums=(0, 1)))
            compiled = fn.lower(h, k, y).compile()
            assert _all_gathers(compiled.as_text()) == [], (vocab_size,
                                                            compiled.as_text()[-2000:])
            temp[vocab_size] = compiled.memory_analysis().temp_size_in_bytes
        print(f"{opts}: temp bytes per device: divisible {temp[None] / 2**20:.2f} MiB, "
              f"padded {temp[v_real] / 2**20:.2f} MiB, ratio {temp[v_real] / temp[None]:.3f}")
        assert temp[v_real] <= 1.2 * temp[None], (opts, temp)
