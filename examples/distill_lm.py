"""Distills the tiny LM (``tiny_lm.py``) into a smaller student with the fused head.

A teacher ``tiny_lm.TinyLM`` is trained on the pydoc help texts. Then the same small student
(narrower, fewer layers) is trained twice from the same initialization on the same batches:
once on the next-word labels alone (``jaxent.linear_cross_entropy``), once on

    alpha * linear_distillation_loss(student_h, student_E, teacher_h, teacher_E)
      + (1 - alpha) * linear_cross_entropy(student_h, student_E, labels)

where the distillation term is the per-token ``KL(teacher || student)`` (``--divergence``)
of the two tied heads, ``[V, D]`` each with its own width, computed without building either
model's ``[tokens, V]`` logits; padding (label -100) counts for nothing in both terms.

A third student learns from a *sparse* teacher (``--teacher-topk K``, 0 to skip): only the
teacher's top-K ids and log-probs per token (``jaxent.linear_topk_log_probs(...,
return_tail=True)``, what a pipeline would store instead of dense logits), passed as
``linear_distillation_loss(student_h, student_E, teacher_topk=(ids, log_probs),
teacher_tail=tail)``: the divergence over the K ids plus one bin for the rest of the
vocabulary. It prints the validation loss (next-word cross-entropy) of the teacher and of
every student.

Run::

    python examples/distill_lm.py --out out/distill_lm
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import optax
import tiny_lm
from flax import nnx
from tqdm import tqdm

import jaxent


def make_optimizer(model, lr: float, steps: int) -> nnx.Optimizer:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10 + 1, steps, lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def sparse_teacher(teacher, inputs, k: int):
    """The teacher's top-``k`` ids, log-probs and tail log-mass per token (fused)."""
    ht = teacher.hidden(inputs)
    return jaxent.linear_topk_log_probs(ht.reshape(-1, ht.shape[-1]),
                                        teacher.embed.embedding[...], k, kernel_layout="vd",
                                        return_tail=True)


def kd_loss(student, teacher, inputs, targets, *, alpha: float, temperature: float,
            divergence: str, topk: int = 0):
    """``alpha * distillation + (1 - alpha) * cross-entropy``, both fused and masked; with
    ``topk`` the teacher is its top-``topk`` log-probs and tail only."""
    h = student.hidden(inputs)
    h = h.reshape(-1, h.shape[-1])
    labels = targets.reshape(-1)
    kw = dict(divergence=divergence, temperature=temperature, kernel_layout="vd",
              labels=labels, ignore_index=tiny_lm.IGNORE)
    if topk:
        ids, lq, tail = jax.lax.stop_gradient(sparse_teacher(teacher, inputs, topk))
        kd = jaxent.linear_distillation_loss(h, student.embed.embedding[...],
                                             teacher_topk=(ids, lq), teacher_tail=tail, **kw)
    else:
        ht = jax.lax.stop_gradient(teacher.hidden(inputs))
        kd = jaxent.linear_distillation_loss(
            h, student.embed.embedding[...], ht.reshape(-1, ht.shape[-1]),
            teacher.embed.embedding[...], **kw)
    ce = tiny_lm.fused_loss(h, student.embed.embedding[...], labels)
    return alpha * kd + (1.0 - alpha) * ce


@nnx.jit(static_argnames=("alpha", "temperature", "divergence", "topk"))
def kd_step(student, teacher, optimizer, inputs, targets, *, alpha: float,
            temperature: float, divergence: str, topk: int = 0):
    """One AdamW step of the student on the mixed loss."""
    def loss_fn(student):
        return kd_loss(student, teacher, inputs, targets, alpha=alpha, temperature=temperature,
                       divergence=divergence, topk=topk)

    loss, grads = nnx.value_and_grad(loss_fn)(student)
    optimizer.update(student, grads)
    return loss


def train_model(model, data, steps, batch_size, lr, seed, desc, progress, teacher=None,
                **kd) -> list[float]:
    """Trains ``model`` in place (with ``teacher``: on the distillation mix); train losses."""
    opt = make_optimizer(model, lr, steps)
    rng = np.random.default_rng(seed)
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for _, idx in zip(bar, tiny_lm.batches(len(data.train_inputs), batch_size, rng),
                      strict=False):
        x, y = data.train_inputs[idx], data.train_targets[idx]
        if teacher is None:
            loss = tiny_lm.train_step(model, opt, x, y, z_loss=0.0)
        else:
            loss = kd_step(model, teacher, opt, x, y, **kd)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def run(*, teacher_steps: int = 600, student_steps: int = 300, batch_size: int = 32,
        alpha: float = 0.5, temperature: float = 1.0, divergence: str = "kl",
        vocab_size: int = 2048, seq_len: int = 32, teacher_d: int = 128, student_d: int = 32,
        teacher_layers: int = 2, student_layers: int = 1, teacher_heads: int = 4,
        student_heads: int = 2, lr: float = 3e-3, seed: int = 0, teacher_topk: int = 32,
        out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Trains the teacher and the students; returns their validation losses and timings."""
    start = time.perf_counter()
    data = tiny_lm.prepare_data("pydoc", vocab_size, seq_len)
    v = len(data.vocab)
    t_cfg = tiny_lm.Config(vocab_size=v, seq_len=seq_len, d_model=teacher_d,
                           num_layers=teacher_layers, num_heads=teacher_heads)
    s_cfg = tiny_lm.Config(vocab_size=v, seq_len=seq_len, d_model=student_d,
                           num_layers=student_layers, num_heads=student_heads)
    teacher = tiny_lm.TinyLM(t_cfg, rngs=nnx.Rngs(seed))
    train_model(teacher, data, teacher_steps, batch_size, lr, seed, "teacher", progress)

    def val(model):
        return tiny_lm.evaluate(model, data.val_inputs, data.val_targets, batch_size)

    plain = tiny_lm.TinyLM(s_cfg, rngs=nnx.Rngs(seed + 1))
    distilled = nnx.clone(plain)  # the same initialization
    sparse = nnx.clone(plain)
    plain_losses = train_model(plain, data, student_steps, batch_size, lr, seed + 1,
                               "student (labels only)", progress)
    kd_losses = train_model(distilled, data, student_steps, batch_size, lr, seed + 1,
                            "student (distilled)", progress, teacher=teacher, alpha=alpha,
                            temperature=temperature, divergence=divergence)
    sparse_losses = []
    if teacher_topk:
        sparse_losses = train_model(sparse, data, student_steps, batch_size, lr, seed + 1,
                                    f"student (top-{teacher_topk} teacher)", progress,
                                    teacher=teacher, alpha=alpha, temperature=temperature,
                                    divergence=divergence, topk=teacher_topk)
    n_params = {name: int(sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))))
                for name, m in (("teacher", teacher), ("student", plain))}
    result = {
        "parameters": n_params, "teacher_val_loss": val(teacher),
        "plain_val_loss": val(plain), "distilled_val_loss": val(distilled),
        "plain_train_loss": plain_losses, "distilled_train_loss": kd_losses,
        "teacher_topk": teacher_topk,
        "sparse_val_loss": val(sparse) if teacher_topk else None,
        "sparse_train_loss": sparse_losses,
        "unigram_val_loss": data.unigram_val_loss, "wall_time_s": time.perf_counter() - start,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "distill_lm.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry: parses options, trains, prints the validation losses."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher-steps", type=int, default=600,
                   help="training steps of the teacher")
    p.add_argument("--student-steps", type=int, default=300,
                   help="training steps of each student (with and without the teacher)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="sequences per step")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="temperature of both models' logits in the distillation term")
    p.add_argument("--divergence", choices=("kl", "reverse_kl", "jsd"), default="kl",
                   help="the distillation divergence")
    p.add_argument("--vocab-size", type=int, default=2048,
                   help="vocabulary of both models")
    p.add_argument("--seq-len", type=int, default=32,
                   help="words per sequence")
    p.add_argument("--teacher-d", type=int, default=128,
                   help="width of the teacher")
    p.add_argument("--student-d", type=int, default=32,
                   help="width of the students")
    p.add_argument("--teacher-layers", type=int, default=2,
                   help="transformer layers of the teacher")
    p.add_argument("--student-layers", type=int, default=1,
                   help="transformer layers of the students")
    p.add_argument("--teacher-heads", type=int, default=4,
                   help="attention heads of the teacher")
    p.add_argument("--student-heads", type=int, default=2,
                   help="attention heads of the students")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed")
    p.add_argument("--teacher-topk", type=int, default=32,
                   help="K of the sparse teacher's top-K log-probs (0: no sparse student)")
    p.add_argument("--out", default="out/distill_lm", help="directory for distill_lm.json")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    a = p.parse_args(argv)
    r = run(teacher_steps=a.teacher_steps, student_steps=a.student_steps,
            batch_size=a.batch_size, alpha=a.alpha, temperature=a.temperature,
            divergence=a.divergence, vocab_size=a.vocab_size, seq_len=a.seq_len,
            teacher_d=a.teacher_d, student_d=a.student_d, teacher_layers=a.teacher_layers,
            student_layers=a.student_layers, teacher_heads=a.teacher_heads,
            student_heads=a.student_heads, lr=a.lr, seed=a.seed, teacher_topk=a.teacher_topk,
            out_dir=a.out,
            progress=not a.no_progress)
    n = r["parameters"]
    print(f"teacher {n['teacher']:,} parameters: validation loss {r['teacher_val_loss']:.3f}")
    print(f"student {n['student']:,} parameters: validation loss without the teacher "
          f"{r['plain_val_loss']:.3f}, with it {r['distilled_val_loss']:.3f} "
          f"(unigram model {r['unigram_val_loss']:.3f})")
    if r["teacher_topk"]:
        print(f"student with the teacher's top-{r['teacher_topk']} log-probs only: validation "
              f"loss {r['sparse_val_loss']:.3f}")
    print(f"wall time {r['wall_time_s']:.1f} s")
    return r


if __name__ == "__main__":
    main()
