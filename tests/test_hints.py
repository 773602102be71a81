"""Porting hints in error messages, and errors that carry no chained chex AssertionError.

The hints answer the usual slips of code ported from PyTorch or optax: NCHW logits without
``axis=1``, labels ``[B, 1]``, labels flattened to ``[B*T]``. The fused loss speaks of
``hidden`` and ``kernel``, never of logits it does not take.
"""

from __future__ import annotations

import traceback

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
