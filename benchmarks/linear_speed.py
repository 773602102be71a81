"""Side-by-side value_and_grad timing (interleaved, medians) of linear cross-entropy.

    python benchmarks/linear_speed.py N D V REPS naive,ours,cce,torch [nowarm=1] [dtype=bfloat16]

``ours`` may carry keywords, e.g. ``ours:impl=vocab:block_size=2048``. Every JAX variant is
compiled ahead of time; ``nowarm=1`` skips the untimed warm-up call (for the big shapes);
``dtype`` sets the inputs' dtype (float32 by default).
"""

import gc
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxent

N, D, V, REPS = (int(a) for a in sys.argv[1:5])
WHICH = sys.argv[5].split(",")
EXTRA = dict(a.split("=") for a in sys.argv[6:])

DTYPE = jnp.dtype(EXTRA.get("dtype", "float32"))
k = jax.random.split(jax.random.key(0), 3)
h = jax.random.normal(k[0], (N, D), jnp.float32).astype(DTYPE)
w = (jax.random.normal(k[1], (D, V), jnp.float32) / np.sqrt(D)).astype(DTYPE)
y = jax.random.randint(k[2], (N,), 0, V)


def _ours(spec):
    kw = {}
    for item in spec.split(":")[1:]:
        key, val = item.split("=")
        kw[key] = val if key == "impl" else int(val)
    return lambda h, w, y: jaxent.linear_cross_entropy(h, w, y, **kw)


def _jax_fn(name):
    if name == "naive":
        return lambda h, w, y: jaxent.cross_entropy(h @ w, y)
    if name == "cce":
        import jax_cce

        return lambda h, w, y: jax_cce.linear_cross_entropy(h, w.T, y)
    return _ours(name)


runs = {}
for name in WHICH:
    if name == "torch":
        import torch
        import torch.nn.functional as F  # noqa: N812

        tdt = getattr(torch, DTYPE.name)
        th = torch.tensor(np.asarray(h, np.float32)).to(tdt).requires_grad_()
        tw = torch.tensor(np.asarray(w, np.float32).T.copy()).to(tdt).requires_grad_()  # [V, D]
        ty = torch.tensor(np.asarray(y)).long()

        def run_torch(th=th, tw=tw, ty=ty):
            th.grad = tw.grad = None
            F.linear_cross_entropy(th, tw, ty).backward()

        runs[name] = run_torch
    else:
        f = jax.jit(jax.value_and_grad(_jax_fn(name), argnums=(0, 1))).lower(h, w, y).compile()
        runs[name] = lambda f=f: jax.block_until_ready(f(h, w, y))
if "nowarm" not in EXTRA:
    for run in runs.values():
        run()

times = {name: [] for name in WHICH}
for rep in range(REPS):
    for name in WHICH:
        gc.collect()
        t0 = time.perf_counter()
        runs[name]()
        times[name].append(time.perf_counter() - t0)
    print("rep", rep, {n: round(t[-1], 2) for n, t in times.items()}, flush=True)
med = {n: float(np.median(t)) for n, t in times.items()}
for n, t in med.items():
    ratio = f"  {t / med['naive']:.3f}x naive" if "naive" in med else ""
    print(f"{n:40s} median {t:8.2f} s{ratio}")
