"""GRPO-style policy-gradient fine-tuning of the tiny LM (``tiny_lm.py``) on the fused head.

A small ``tiny_lm.TinyLM`` is first pretrained on the pydoc help texts (next-token loss with
``jaxent.linear_cross_entropy``). Then it is fine-tuned by reinforcement: for each of
``--prompts`` prompts (the first words of validation rows) ``--group`` completions of
``--completion`` words are sampled, each prompt with its own sampling temperature; the reward
of a completion is the fraction of its words that lie in a target set (``--targets``). As in
GRPO (Shao et al., 2024) the advantage of a completion is its reward standardized within its
prompt's group, and the loss is ``jaxent.objectives.grpo_loss`` (PPO's clipped ratio, each
completion's tokens averaged, then the completions) with its entropy bonus, plus the exact
KL to the frozen pretrained model:

    - min(r A, clip(r, 0.8, 1.2) A)  -  c_H * H(pi)  +  c_KL * KL(pi || pi_ref)

with ``log pi`` and the entropy ``H`` from ``jaxent.linear_log_probs(..., temperature=T_row,
return_entropy=True)`` and the per-token KL from ``jaxent.linear_distillation_loss(...,
divergence="reverse_kl")`` (the whole distribution's, not GRPO's k3 estimate from the sampled
token): neither the policy's nor the reference's ``[tokens, V]`` logits are ever built. With
one update per batch of samples (the default) the ratio ``r = pi / pi_old`` is 1 and the
gradient is GRPO's ``-A grad log pi``; ``--updates-per-batch 2`` takes further clipped steps
on the same samples. A tqdm bar shows the reward; a PNG plots the mean reward and the KL per
step.

Run::

    python examples/rl_tiny_lm.py --out out/rl_tiny_lm
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tiny_lm
from flax import nnx
from tqdm import tqdm

import jaxent

TARGET_WORDS = ("function", "return", "value", "object", "list", "string", "file", "module",
                "class", "method", "type", "name", "default", "argument", "attribute")


# ------------------------------------------------------------------------- pretraining


def pretrain(cfg: tiny_lm.Config, data: tiny_lm.Data, steps: int, batch_size: int, lr: float,
             seed: int, progress: bool) -> tiny_lm.TinyLM:
    """Next-token pretraining with ``tiny_lm.train_step`` (fused cross-entropy)."""
    model = tiny_lm.TinyLM(cfg, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10 + 1, steps, lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="pretrain", unit="step", disable=not progress)
    for _, idx in zip(bar, tiny_lm.batches(len(data.train_inputs), batch_size, rng),
                      strict=False):
        loss = tiny_lm.train_step(model, opt, data.train_inputs[idx], data.train_targets[idx],
                                  z_loss=1e-4)
        bar.set_postfix(loss=f"{float(loss):.3f}")
    return model


# ---------------------------------------------------------------------------- sampling


@nnx.jit(static_argnames=("prompt_len",))
def sample(model: tiny_lm.TinyLM, buffer: jax.Array, temps: jax.Array, key: jax.Array, *,
           prompt_len: int) -> jax.Array:
    """Fills ``buffer[:, prompt_len:]`` by sampling word after word at row temperatures
    ``temps [R]`` (no KV cache: the fixed-size window is re-run each step)."""
    embedding = model.embed.embedding[...]
    banned = jnp.zeros(embedding.shape[0]).at[jnp.array([0, 1, 2])].set(-jnp.inf)

    def step(pos, carry):
        buf, key = carry
        h = model.hidden(buf)[:, pos - 1]  # [R, D]: only the last position's logits
        logits = h @ embedding.T / temps[:, None] + banned[None, :]
        key, sub = jax.random.split(key)
        nxt = jax.random.categorical(sub, logits).astype(buf.dtype)
        return buf.at[:, pos].set(nxt), key

    buf, _ = jax.lax.fori_loop(prompt_len, buffer.shape[1], step, (buffer, key))
    return buf


def rewards(completions: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
    """Fraction of each completion's words that are target words: ``[R]``."""
    return np.isin(completions, target_ids).mean(axis=1)


def group_advantages(r: np.ndarray, group: int) -> np.ndarray:
    """GRPO: rewards standardized within each prompt's group of completions."""
    g = r.reshape(-1, group)
    return ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-4)).reshape(-1)


# ----------------------------------------------------------------------------- RL loss


def completion_log_probs(model, tokens, temps, *, prompt_len: int, return_entropy=False):
    """Log-probs ``[R, S-1]`` of the sampled words (0 on the prompt) and, optionally, the
    entropies; the hidden states ``[R*(S-1), D]``, the row temperatures and the mask."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    r, t = targets.shape
    mask = jnp.broadcast_to(jnp.arange(t)[None, :] >= prompt_len - 1, (r, t))
    h = model.hidden(inputs).reshape(r * t, -1)
    row_temps = jnp.broadcast_to(temps[:, None], (r, t)).reshape(-1)
    out = jaxent.linear_log_probs(h, model.embed.embedding[...], targets.reshape(-1),
                                  kernel_layout="vd", temperature=row_temps,
                                  where=mask.reshape(-1), return_entropy=return_entropy)
    out = tuple(x.reshape(r, t) for x in out) if return_entropy else out.reshape(r, t)
    return out, h, row_temps, mask


@nnx.jit(static_argnames=("prompt_len",))
def sampler_log_probs(model, tokens, temps, *, prompt_len: int):
    """``log pi_old`` of the samples, for the clipped ratio of later updates on them."""
    return completion_log_probs(model, tokens, temps, prompt_len=prompt_len)[0]


def rl_loss(model, ref_model, tokens, advantages, temps, old_logp=None, *, prompt_len: int,
            entropy_coef: float, kl_coef: float):
    """GRPO loss of sampled ``tokens [R, S]`` (the completion part counts); ``old_logp``
    None: the samples come from ``model`` itself (the ratio is 1)."""
    (logp, ent), h, row_temps, mask = completion_log_probs(
        model, tokens, temps, prompt_len=prompt_len, return_entropy=True)
    inputs = tokens[:, :-1]
    h_ref = jax.lax.stop_gradient(ref_model.hidden(inputs).reshape(h.shape))
    kl = jaxent.linear_distillation_loss(h, model.embed.embedding[...], h_ref,
                                         ref_model.embed.embedding[...],
                                         divergence="reverse_kl", temperature=row_temps,
                                         kernel_layout="vd", where=mask.reshape(-1))
    old = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
    pg, metrics = jaxent.objectives.grpo_loss(logp, old, advantages, mask, kl_coef=0.0,
                                              entropy=ent, entropy_coef=entropy_coef)
    loss = pg + kl_coef * kl
    clip_frac = metrics.clip_frac_low + metrics.clip_frac_high
    return loss, {"kl": kl, "entropy": metrics.entropy, "clip_frac": clip_frac}


@nnx.jit(static_argnames=("prompt_len", "entropy_coef", "kl_coef"))
def rl_step(model, ref_model, optimizer, tokens, advantages, temps, old_logp=None, *,
            prompt_len: int, entropy_coef: float, kl_coef: float):
    """One policy update; returns the loss and ``{"kl", "entropy", "clip_frac"}``."""
    def loss_fn(model):
        return rl_loss(model, ref_model, tokens, advantages, temps, old_logp,
                       prompt_len=prompt_len, entropy_coef=entropy_coef, kl_coef=kl_coef)

    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, aux


# -------------------------------------------------------------------------------- main


def run(*, pretrain_steps: int = 300, rl_steps: int = 100, prompts: int = 8, group: int = 8,
        prompt_len: int = 8, completion: int = 16, lr: float = 1e-3, entropy_coef: float = 1e-2,
        kl_coef: float = 0.1, vocab_size: int = 2048, d_model: int = 64, seed: int = 0,
        updates_per_batch: int = 1, out_dir: str | Path | None = None,
        progress: bool = True) -> dict:
    """Pretrains, fine-tunes by GRPO and returns the per-step curves and timings."""
    if updates_per_batch < 1:
        raise ValueError(f"`updates_per_batch` must be >= 1, got {updates_per_batch}")
    start = time.perf_counter()
    seq_len = prompt_len + completion
    data = tiny_lm.prepare_data("pydoc", vocab_size, seq_len)
    cfg = tiny_lm.Config(vocab_size=len(data.vocab), seq_len=seq_len, d_model=d_model,
                         num_layers=2, num_heads=4)
    model = pretrain(cfg, data, pretrain_steps, 32, 3e-3, seed, progress)
    ref_model = nnx.clone(model)  # the frozen starting model for the KL penalty
    pretrain_s = time.perf_counter() - start
    index = {w: i for i, w in enumerate(data.vocab.words)}
    target_ids = np.array([index[w] for w in TARGET_WORDS if w in index])

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    starts = data.val_inputs[(data.val_inputs[:, :prompt_len] > 2).all(1)][:, :prompt_len]
    # One sampling temperature per prompt (shared by its group): a per-row array.
    prompt_temps = np.linspace(0.8, 1.2, prompts).astype(np.float32)
    temps = jnp.asarray(np.repeat(prompt_temps, group))
    hist: dict = {"reward": [], "kl": [], "entropy": [], "clip_frac": []}
    bar = tqdm(range(rl_steps), desc="grpo", unit="step", disable=not progress)
    for _ in bar:
        chosen = starts[rng.choice(len(starts), prompts, replace=False)]
        buffer = np.zeros((prompts * group, seq_len), np.int32)
        buffer[:, :prompt_len] = np.repeat(chosen, group, axis=0)
        key, sub = jax.random.split(key)
        tokens = np.asarray(sample(model, jnp.asarray(buffer), temps, sub,
                                   prompt_len=prompt_len))
        r = rewards(tokens[:, prompt_len:], target_ids)
        adv = jnp.asarray(group_advantages(r, group), jnp.float32)
        tokens_j = jnp.asarray(tokens)
        old_logp = None  # the first update is on-policy: the ratio is 1
        if updates_per_batch > 1:
            old_logp = sampler_log_probs(model, tokens_j, temps, prompt_len=prompt_len)
        clip_frac = 0.0
        for _ in range(updates_per_batch):
            _, aux = rl_step(model, ref_model, optimizer, tokens_j, adv, temps, old_logp,
                             prompt_len=prompt_len, entropy_coef=entropy_coef, kl_coef=kl_coef)
            clip_frac = max(clip_frac, float(aux["clip_frac"]))
        hist["reward"].append(float(r.mean()))
        hist["kl"].append(float(aux["kl"]))
        hist["entropy"].append(float(aux["entropy"]))
        hist["clip_frac"].append(clip_frac)
        bar.set_postfix(reward=f"{hist['reward'][-1]:.3f}", kl=f"{hist['kl'][-1]:.3f}")

    k = max(1, rl_steps // 10)
    result = {
        **hist, "target_words": [data.vocab.words[i] for i in target_ids],
        "first_reward": float(np.mean(hist["reward"][:k])),
        "last_reward": float(np.mean(hist["reward"][-k:])),
        "pretrain_s": pretrain_s, "wall_time_s": time.perf_counter() - start,
        "sample": data.vocab.decode(tokens[0].tolist()),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rl_tiny_lm.json").write_text(json.dumps(result, indent=1))
        plot(hist, out / "rl_tiny_lm.png")
    return result


def plot(hist: dict, path: Path) -> None:
    """Mean reward and KL(pi || pi_ref) per RL step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(hist["reward"]) + 1)
    ax.plot(steps, hist["reward"], color="C0", label="mean reward")
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward (target-word fraction)", color="C0")
    ax2 = ax.twinx()
    ax2.plot(steps, hist["kl"], color="C1", label="KL(pi || pi_ref)")
    ax2.set_ylabel("KL to the starting model (nats/token)", color="C1")
    ax.set_title("GRPO on the tiny LM with jaxent.objectives.grpo_loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry: parses options, runs, prints the outcome."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=300,
                   help="supervised steps on the corpus before RL (the starting model)")
    p.add_argument("--rl-steps", type=int, default=100,
                   help="policy-gradient steps (the default run takes 1-2 minutes on 2 cores)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (GRPO group)")
    p.add_argument("--prompt-len", type=int, default=8,
                   help="words per prompt")
    p.add_argument("--completion", type=int, default=16, help="sampled words per completion")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate of the RL steps")
    p.add_argument("--entropy-coef", type=float, default=1e-2,
                   help="weight of the entropy bonus")
    p.add_argument("--kl-coef", type=float, default=0.1,
                   help="weight of the KL penalty to the frozen starting model")
    p.add_argument("--vocab-size", type=int, default=2048,
                   help="vocabulary of the tiny LM")
    p.add_argument("--d-model", type=int, default=64,
                   help="width of the tiny LM")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed")
    p.add_argument("--updates-per-batch", type=int, default=1,
                   help="clipped policy updates on each batch of samples")
    p.add_argument("--out", default="out/rl_tiny_lm", help="directory for the JSON and PNG")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    a = p.parse_args(argv)
    r = run(pretrain_steps=a.pretrain_steps, rl_steps=a.rl_steps, prompts=a.prompts,
            group=a.group, prompt_len=a.prompt_len, completion=a.completion, lr=a.lr,
            entropy_coef=a.entropy_coef, kl_coef=a.kl_coef, vocab_size=a.vocab_size,
            d_model=a.d_model, seed=a.seed, updates_per_batch=a.updates_per_batch,
            out_dir=a.out, progress=not a.no_progress)
    print(f"target words: {', '.join(r['target_words'])}")
    print(f"mean reward: first {len(r['reward']) // 10 or 1} steps {r['first_reward']:.3f} -> "
          f"last {r['last_reward']:.3f}; final KL to the start {r['kl'][-1]:.3f} nats/token, "
          f"entropy {r['entropy'][-1]:.3f}")
    print(f"sample: {r['sample']!r}")
    print(f"wall time {r['wall_time_s']:.1f} s (pretraining {r['pretrain_s']:.1f} s)")
    return r


if __name__ == "__main__":
    main()
