"""Porting hints in error messages, and errors that carry no chained chex AssertionError.

The hints answer the usual slips of code ported from PyTorch or optax: NCHW logits without
``axis=1``, labels ``[B, 1]``, labels flattened to ``[B*T]``. The fused loss speaks of
``hidden`` and ``kernel``, never of logits it does not take.
"""

from __future__ import annotations

import traceback

import jax
import jax.numpy as jnp
import pytest

import jaxent

AXIS_HINT = "did you mean axis=1?"
SQUEEZE_HINT = "squeeze the last axis of the labels (labels[..., 0])"


def _error(fn, *args, **kwargs) -> Exception:
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*args, **kwargs)
    return info.value


def _assert_not_chained(err: Exception) -> None:
    """No ``raise ... from err`` and no implicit context (or a suppressed one)."""
    assert err.__cause__ is None
    assert err.__suppress_context__ or err.__context__ is None
    text = "".join(traceback.format_exception(err))
    assert "AssertionError" not in text, text


LOSSES = {
    "cross_entropy": jaxent.cross_entropy,
    "nll_loss": jaxent.nll_loss,
}


@pytest.mark.parametrize("name", LOSSES)
def test_nchw_logits_without_axis_1(name):
    logits = jnp.zeros((2, 5, 4, 4))                    # (N, C, H, W), 5 classes
    labels = jnp.zeros((2, 4, 4), jnp.int32)
    err = _error(LOSSES[name], logits, labels)
    assert isinstance(err, ValueError)
    assert AXIS_HINT in str(err)
    assert "(2, 4, 4)" in str(err) and "(2, 5, 4)" in str(err)
    _assert_not_chained(err)
    assert LOSSES[name](logits, labels, axis=1).shape == ()  # the hint is right


@pytest.mark.parametrize("name", LOSSES)
def test_labels_with_a_trailing_unit_axis(name):
    err = _error(LOSSES[name], jnp.zeros((4, 3)), jnp.zeros((4, 1), jnp.int32))
    assert SQUEEZE_HINT in str(err)
    assert AXIS_HINT not in str(err)
    _assert_not_chained(err)
    err = _error(LOSSES[name], jnp.zeros((2, 8, 100)), jnp.zeros((2, 8, 1), jnp.int32))
    assert SQUEEZE_HINT in str(err)
    _assert_not_chained(err)


@pytest.mark.parametrize("name", LOSSES)
def test_flattened_labels_for_batch_time_logits(name):
    err = _error(LOSSES[name], jnp.zeros((2, 8, 100)), jnp.zeros((16,), jnp.int32))
    assert "reshape the labels to [2, 8]" in str(err)
    _assert_not_chained(err)


@pytest.mark.parametrize("name", LOSSES)
def test_no_hint_when_none_fits(name):
    err = _error(LOSSES[name], jnp.zeros((4, 3)), jnp.zeros((5,), jnp.int32))
    assert "must have shape (4,)" in str(err)
    assert ";" not in str(err).split("got shape (5,)")[1]
    _assert_not_chained(err)


def test_torch_style_objects_take_axis_1():
    logits = jnp.zeros((2, 5, 4, 4))
    labels = jnp.zeros((2, 4, 4), jnp.int32)
    assert jaxent.CrossEntropyLoss()(logits, labels).shape == ()
    assert jaxent.NLLLoss()(logits, labels).shape == ()


@pytest.mark.parametrize("call", [
    lambda: jaxent.cross_entropy(jnp.zeros((4, 3)), jnp.zeros(4)),                 # dtype
    lambda: jaxent.cross_entropy(jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32),
                                 where=jnp.zeros((4, 1), bool)),                   # where
    lambda: jaxent.soft_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4, 2))),       # targets
    lambda: jaxent.cross_entropy(jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32),
                                 weight=jnp.ones(2)),                              # weight
    lambda: jaxent.cross_entropy(jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32), axis=2),
    lambda: jaxent.cross_entropy(jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32),
                                 reduction="avg"),
    lambda: jaxent.binary_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4, 2))),
], ids=["labels-dtype", "where-shape", "targets-shape", "weight-shape", "axis", "reduction",
        "binary-targets"])
def test_errors_are_not_chained(call):
    _assert_not_chained(_error(call))


# ------------------------------------------------------------------ the fused loss

H = jnp.zeros((2, 8, 16))        # [B, T, D]
K = jnp.zeros((16, 100))         # [D, V]
Y = jnp.zeros((2, 8), jnp.int32)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(labels=jnp.zeros((16,), jnp.int32)), "reshape the labels to [2, 8]"),
    (dict(labels=jnp.zeros((2, 8, 1), jnp.int32)), SQUEEZE_HINT),
    (dict(labels=jnp.zeros((2, 7), jnp.int32)), "hidden.shape[:-1]"),
    (dict(labels=jnp.zeros((2, 8))), "integer class indices"),
    (dict(kernel=jnp.zeros((100, 16))), "it looks transposed, pass kernel_layout='vd'"),
    (dict(kernel=jnp.zeros((100, 16)), kernel_layout="vd", labels=Y,
          hidden=jnp.zeros((2, 8, 100))), "[V, D]"),
    (dict(kernel=jnp.zeros((12, 100))), "D = hidden.shape[-1] = 16"),
    (dict(kernel=jnp.zeros((16, 100, 1))), "`kernel` must be 2-D"),
    (dict(bias=jnp.zeros(99)), "`bias` must have shape (100,)"),
    (dict(bias=jnp.zeros((1, 100))), "`bias` must have shape (100,)"),
    (dict(where=jnp.zeros((16,), bool)), "`where` must have shape (2, 8)"),
], ids=["labels-flat", "labels-unit-axis", "labels-shape", "labels-dtype", "kernel-transposed",
        "kernel-vd", "kernel-D", "kernel-rank", "bias-length", "bias-rank", "where"])
def test_fused_errors_speak_of_hidden_and_kernel(kwargs, fragment):
    args = dict(hidden=H, kernel=K, labels=Y)
    args.update(kwargs)
    hidden, kernel, labels = args.pop("hidden"), args.pop("kernel"), args.pop("labels")
    err = _error(jaxent.linear_cross_entropy, hidden, kernel, labels, **args)
    assert fragment in str(err), str(err)
    assert "logits" not in str(err), f"the fused loss takes no logits: {err}"
    assert AXIS_HINT not in str(err)
    _assert_not_chained(err)


# ------------------------------------------------- the PyTorch tutorials' three slips
UNBATCHED_HINT = "one unbatched example takes a scalar label (labels[0])"
ONE_HOT_HINT = "these look like one-hot targets: pass class indices (labels.argmax(axis=1))"
LAST_AXIS_HINT = "the classes look like the last axis (JAX's [..., C] layout), not axis 1"


@pytest.mark.parametrize("loss", [jaxent.CrossEntropyLoss(), jaxent.cross_entropy],
                         ids=["CrossEntropyLoss", "cross_entropy"])
def test_unbatched_logits_with_a_batched_label(loss):
    logits = jnp.array([0.3, -1.2, 2.0, 0.5])            # (C,): one example, unbatched
    err = _error(loss, logits, jnp.array([2]))           # (1,): torch's batched target
    assert UNBATCHED_HINT in str(err) and "logits[None]" in str(err)
    _assert_not_chained(err)
    # Both fixes the hint names give the same (right) number.
    expected = -jax.nn.log_softmax(logits)[2]
    assert jnp.allclose(loss(logits, jnp.array([2])[0]), expected)
    assert jnp.allclose(loss(logits[None], jnp.array([2])), expected)


@pytest.mark.parametrize("loss", [jaxent.CrossEntropyLoss(), jaxent.cross_entropy],
                         ids=["CrossEntropyLoss", "cross_entropy"])
def test_integer_one_hot_targets(loss):
    logits = jax.random.normal(jax.random.key(0), (5, 4))
    labels = jnp.array([3, 0, 1, 3, 2])
    one_hot = jax.nn.one_hot(labels, 4, dtype=jnp.int32)
    err = _error(loss, logits, one_hot)
    assert ONE_HOT_HINT in str(err) and "astype(jnp.float32)" in str(err)
    _assert_not_chained(err)
    expected = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(5), labels])
    assert jnp.allclose(loss(logits, one_hot.argmax(axis=1)), expected, rtol=1e-6)
    assert jnp.allclose(jaxent.CrossEntropyLoss()(logits, one_hot.astype(jnp.float32)),
                        expected, rtol=1e-6)


@pytest.mark.parametrize("loss", [jaxent.CrossEntropyLoss(), jaxent.NLLLoss()],
                         ids=["CrossEntropyLoss", "NLLLoss"])
def test_jax_layout_logits_to_the_torch_style_class(loss):
    logits = jax.nn.log_softmax(jax.random.normal(jax.random.key(1), (2, 6, 11)))  # [B, T, V]
    tokens = jax.random.randint(jax.random.key(2), (2, 6), 0, 11)
    err = _error(loss, logits, tokens)
    assert LAST_AXIS_HINT in str(err) and "did you mean axis=-1?" in str(err)
    assert AXIS_HINT not in str(err)
    _assert_not_chained(err)
    # The fix the hint names (the classes moved to axis 1) gives the per-token mean.
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    expected = -jnp.mean(picked - jax.nn.logsumexp(logits, axis=-1))
    assert jnp.allclose(loss(jnp.moveaxis(logits, -1, 1), tokens), expected, rtol=1e-6)
