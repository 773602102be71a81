"""The PyTorch-style loss objects equal their torch.nn counterparts on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxent


@pytest.mark.parametrize("shape", [(6,), (4, 6), (3, 6, 5, 2)])
@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.1, reduction="sum"),
                                dict(ignore_index=2, reduction="none")])
def test_cross_entropy_loss_dispatches_like_torch(rng, shape, kw):
    c = 6
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
    label_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    y = rng.integers(0, c, size=label_shape)
    t = np.moveaxis(rng.dirichlet(np.ones(c), size=label_shape), -1,
                    1 if len(shape) > 1 else 0).astype(np.float32)
    ours = jaxent.CrossEntropyLoss(weight=w, **kw)
    theirs = torch.nn.CrossEntropyLoss(weight=torch.tensor(w), **kw)
    np.testing.assert_allclose(ours(x, y), theirs(torch.tensor(x), torch.tensor(y)),
                               rtol=2e-5, atol=1e-6)
    if "ignore_index" in kw:  # torch refuses ignore_index with probability targets; so do we
        with pytest.raises(RuntimeError, match="ignore_index"):
            theirs(torch.tensor(x), torch.tensor(t))
        with pytest.raises(ValueError, match="`ignore_index`"):
            ours(x, t)
    else:
        np.testing.assert_allclose(ours(x, t), theirs(torch.tensor(x), torch.tensor(t)),
                                   rtol=2e-5, atol=1e-6)


def test_nll_and_bce_objects_match_torch(rng):
    lp = np.log(rng.dirichlet(np.ones(5), size=4)).astype(np.float32)
    y = rng.integers(0, 5, size=4)
    np.testing.assert_allclose(jaxent.NLLLoss(reduction="sum")(lp, y),
                               torch.nn.NLLLoss(reduction="sum")(torch.tensor(lp), torch.tensor(y)),
                               rtol=2e-5)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    t = rng.uniform(size=(4, 5)).astype(np.float32)
    pw = rng.uniform(1, 3, size=5).astype(np.float32)
    np.testing.assert_allclose(
        jaxent.BCEWithLogitsLoss(pos_weight=pw)(x, t),
        torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pw))(torch.tensor(x), torch.tensor(t)),
        rtol=2e-5)
