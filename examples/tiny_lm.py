"""A tiny decoder-only transformer (Flax NNX) trained with ``jaxent.linear_cross_entropy``.

The corpus ships with Python itself: the interactive help texts in ``pydoc_data.topics`` and
the docstrings of the standard library's modules, classes and functions (read with ``ast``
from the installed sources). A word-level vocabulary of ``--vocab-size`` (8192 by default) is
built from the training documents, so the output layer (``[V, D]``, tied to the input
embedding) and above all its ``[tokens, V]`` logits dominate memory. The loss is fused:
``jaxent.linear_cross_entropy(hidden, embedding, labels, kernel_layout="vd",
ignore_index=-100, z_loss=...)`` never builds the logits. Documents are packed into rows and
the tail of each row is padded; padded targets are ``-100`` and count for nothing.

It reports tokens/s, the compiled memory of the fused loss against the naive head
(``hidden @ embedding.T`` then cross-entropy), train and validation loss against the unigram
entropy of the corpus, and prints a generated sample at the end.

Run::

    python examples/tiny_lm.py --steps 600 --out out/tiny_lm
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import math
import re
import sysconfig
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import jaxent

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
IGNORE = -100  # jaxent's default ignore_index, PyTorch's too


# ----------------------------------------------------------------------------- corpus


def load_documents(corpus: str = "pydoc+stdlib", max_files: int | None = None) -> list[str]:
    """Text documents that ship with Python.

    Args:
        corpus: ``"pydoc"`` for the ~80 help topics of ``pydoc_data.topics`` (about 110k
            words, 4k distinct), or ``"pydoc+stdlib"`` to add every docstring of the
            installed standard library's sources (about 0.5M words, 16k distinct).
        max_files: read at most this many stdlib source files (sorted), for quick runs.
    """
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    if corpus == "pydoc":
        return docs
    if corpus != "pydoc+stdlib":
        raise ValueError(f"corpus must be 'pydoc' or 'pydoc+stdlib', got {corpus!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "pydoc_data"}
    files = sorted(
        p for p in root.rglob("*.py")
        if not any(part in skip or part.startswith("test") for part in p.relative_to(root).parts)
    )
    for path in files[:max_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return docs


_TOKEN = re.compile(r"\w+|[^\w\s]|\n")


def tokenize(text: str) -> list[str]:
    """Words, single punctuation marks and line breaks (runs of blank lines become one)."""
    tokens = _TOKEN.findall(text)
    return [t for i, t in enumerate(tokens) if t != "\n" or i == 0 or tokens[i - 1] != "\n"]


def detokenize(tokens: Sequence[str]) -> str:
    """A readable string from tokens: no space before closing punctuation or after opening."""
    text = " ".join(tokens)
    text = re.sub(r" ?\n ?", "\n", text)
    text = re.sub(r" ([.,:;!?)\]}])", r"\1", text)
    return re.sub(r"([(\[{]) ", r"\1", text)


@dataclass(frozen=True)
class Vocab:
    """Word-level vocabulary: ids 0, 1, 2 are ``<pad>``, ``<unk>``, ``<eos>``."""

    words: tuple[str, ...]

    @classmethod
    def build(cls, docs_tokens: Sequence[Sequence[str]], size: int) -> Vocab:
        """The ``size - 3`` most frequent tokens plus the three specials."""
        counts = collections.Counter(t for doc in docs_tokens for t in doc)
        return cls((PAD, UNK, EOS, *(w for w, _ in counts.most_common(size - 3))))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Token ids, unknown words mapped to ``<unk>``, with ``<eos>`` appended."""
        index = self._index
        return [index.get(t, 1) for t in tokens] + [2]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (specials other than ``<unk>`` dropped)."""
        return detokenize([self.words[i] for i in ids if i not in (0, 2)])

    @property
    def _index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}


def pack_rows(docs_ids: Sequence[Sequence[int]], seq_len: int) -> np.ndarray:
    """Packs documents greedily into ``[rows, seq_len + 1]`` int32 rows, padding each row's tail
    with ``<pad>`` (id 0). Documents longer than a row are cut into row-sized pieces."""
    row_len = seq_len + 1
    rows, current = [], []
    for ids in docs_ids:
        for start in range(0, len(ids), row_len):
            piece = list(ids[start : start + row_len])
            if len(current) + len(piece) > row_len:
                rows.append(current)
                current = []
            current += piece
    if current:
        rows.append(current)
    out = np.zeros((len(rows), row_len), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def inputs_and_targets(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token pairs: inputs ``rows[:, :-1]``, targets ``rows[:, 1:]`` with pads -> -100."""
    targets = rows[:, 1:].copy()
    targets[targets == 0] = IGNORE
    return rows[:, :-1], targets


@dataclass
class Data:
    """Tokenized, packed train and validation sets and their vocabulary."""

    vocab: Vocab
    train_inputs: np.ndarray
    train_targets: np.ndarray
    val_inputs: np.ndarray
    val_targets: np.ndarray
    unigram_entropy: float  # nats, of the training targets
    unigram_val_loss: float  # nats, training frequencies (add-one) scored on validation


def prepare_data(
    corpus: str, vocab_size: int, seq_len: int, val_every: int = 20, max_files: int | None = None
) -> Data:
    """Loads, splits (every ``val_every``-th document is validation), tokenizes and packs."""
    docs = [tokenize(d) for d in load_documents(corpus, max_files)]
    train_docs = [d for i, d in enumerate(docs) if i % val_every]
    val_docs = [d for i, d in enumerate(docs) if i % val_every == 0]
    vocab = Vocab.build(train_docs, vocab_size)
    train_in, train_tg = inputs_and_targets(pack_rows([vocab.encode(d) for d in train_docs],
                                                      seq_len))
    val_in, val_tg = inputs_and_targets(pack_rows([vocab.encode(d) for d in val_docs], seq_len))

    counts = np.bincount(train_tg[train_tg != IGNORE], minlength=len(vocab)).astype(np.float64)
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    smoothed = (counts + 1) / (counts.sum() + len(vocab))
    unigram_val = float(-np.log(smoothed[val_tg[val_tg != IGNORE]]).mean())
    return Data(vocab, train_in, train_tg, val_in, val_tg, entropy, unigram_val)


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Config:
    """Model size. The defaults give ~1.5M parameters, two thirds of them the embedding."""

    vocab_size: int = 8192
    seq_len: int = 128
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class TinyLM(nnx.Module):
    """Decoder-only transformer whose output layer is its (tied) input embedding ``[V, D]``."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (cfg.seq_len, cfg.d_model)))
        self.blocks = nnx.List([Block(cfg.d_model, cfg.num_heads, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Final hidden states ``[B, T, D]`` for token ids ``[B, T]``."""
        x = self.embed(tokens) + self.pos[None, : tokens.shape[1]]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Full logits ``[B, T, V]``: only for generation, training never builds them."""
        return self.embed.attend(self.hidden(tokens))


# ----------------------------------------------------------------------------- loss


def fused_loss(
    hidden: jax.Array, embedding: jax.Array, targets: jax.Array, *, z_loss: float = 0.0,
    reduction: str = "mean",
) -> jax.Array:
    """Cross-entropy of ``hidden @ embedding.T`` against ``targets`` without the logits.

    ``hidden`` is ``[N, D]``, ``embedding`` the tied ``[V, D]`` table, ``targets`` ``[N]`` with
    -100 for padding.
    """
    return jaxent.linear_cross_entropy(
        hidden, embedding, targets, kernel_layout="vd", ignore_index=IGNORE, z_loss=z_loss,
        reduction=reduction)


def naive_loss(
    hidden: jax.Array, embedding: jax.Array, targets: jax.Array, *, z_loss: float = 0.0,
    reduction: str = "mean",
) -> jax.Array:
    """The same loss through the full ``[N, V]`` logits: the baseline for memory."""
    return jaxent.cross_entropy(hidden @ embedding.T, targets, ignore_index=IGNORE,
                                z_loss=z_loss, reduction=reduction)


def lm_loss(model: TinyLM, inputs: jax.Array, targets: jax.Array, z_loss: float) -> jax.Array:
    """Mean next-token loss over the non-padding targets (plus ``z_loss``)."""
    hidden = model.hidden(inputs)
    return fused_loss(hidden.reshape(-1, hidden.shape[-1]), model.embed.embedding[...],
                      targets.reshape(-1), z_loss=z_loss)


@nnx.jit(static_argnames="z_loss")
def train_step(model: TinyLM, optimizer: nnx.Optimizer, inputs, targets, *, z_loss: float):
    """One AdamW step; returns the mean loss of the batch."""
    loss, grads = nnx.value_and_grad(lm_loss)(model, inputs, targets, z_loss)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_sums(model: TinyLM, inputs, targets) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy (no z-loss) and the number of counted targets."""
    hidden = model.hidden(inputs)
    flat = targets.reshape(-1)
    total = fused_loss(hidden.reshape(-1, hidden.shape[-1]), model.embed.embedding[...], flat,
                       reduction="sum")
    return total, jnp.sum(flat != IGNORE)


def evaluate(model: TinyLM, inputs: np.ndarray, targets: np.ndarray, batch_size: int) -> float:
    """Mean cross-entropy (nats per token) over a whole set, in fixed-shape batches."""
    total, count = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        if len(x) < batch_size:  # pad the last batch with fully ignored rows: one compile
            fill = batch_size - len(x)
            x = np.concatenate([x, np.zeros((fill, x.shape[1]), x.dtype)])
            y = np.concatenate([y, np.full((fill, y.shape[1]), IGNORE, y.dtype)])
        s, n = eval_sums(model, x, y)
        total, count = total + float(s), count + int(n)
    return total / max(count, 1)


def loss_memory(n_tokens: int, d_model: int, vocab_size: int) -> dict[str, float]:
    """Compiled temporary memory (MiB) of value-and-grad of the fused loss and of the naive
    head at the training shapes, from XLA's ``memory_analysis``."""
    h = jax.ShapeDtypeStruct((n_tokens, d_model), jnp.float32)
    e = jax.ShapeDtypeStruct((vocab_size, d_model), jnp.float32)
    y = jax.ShapeDtypeStruct((n_tokens,), jnp.int32)
    out = {"logits_mib": n_tokens * vocab_size * 4 / 2**20}
    for name, fn in (("fused", fused_loss), ("naive", naive_loss)):
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(h, e, y).compile()
        stats = compiled.memory_analysis()
        out[f"{name}_temp_mib"] = stats.temp_size_in_bytes / 2**20 if stats else float("nan")
    return out


# ----------------------------------------------------------------------------- sampling


@nnx.jit
def _next_logits(model: TinyLM, buffer: jax.Array, position: jax.Array) -> jax.Array:
    return model(buffer)[0, position]


def generate(
    model: TinyLM, vocab: Vocab, prompt: str, num_tokens: int, *, temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """Samples ``num_tokens`` words after ``prompt`` (no KV cache: a fixed-size window is
    re-run each step, so one compile serves the whole loop)."""
    seq_len = model.pos.shape[0]
    ids = vocab.encode(tokenize(prompt))[:-1]
    key = jax.random.key(seed)
    banned = jnp.zeros(len(vocab)).at[jnp.array([0, 1])].set(-jnp.inf)  # no <pad>, no <unk>
    for _ in range(num_tokens):
        window = ids[-seq_len:]
        buffer = np.zeros((1, seq_len), np.int32)
        buffer[0, : len(window)] = window
        logits = _next_logits(model, buffer, jnp.int32(len(window) - 1))
        key, sub = jax.random.split(key)
        next_id = int(jax.random.categorical(sub, logits / temperature + banned))
        if next_id == 2:  # <eos>
            break
        ids.append(next_id)
    return vocab.decode(ids)


# ----------------------------------------------------------------------------- loop


def batches(n_rows: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless shuffled row indices, epoch after epoch, full batches only."""
    while True:
        order = rng.permutation(n_rows)
        for start in range(0, n_rows - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train(
    *,
    steps: int = 600,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    z_loss: float = 1e-4,
    cfg: Config = Config(),
    corpus: str = "pydoc+stdlib",
    max_files: int | None = None,
    eval_every: int = 100,
    sample_tokens: int = 40,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Trains the tiny LM and returns a dict of the measured numbers (see ``main``)."""
    start = time.perf_counter()
    data = prepare_data(corpus, cfg.vocab_size, cfg.seq_len, max_files=max_files)
    cfg = Config(**{**asdict(cfg), "vocab_size": len(data.vocab)})  # a small corpus may fill less
    model = TinyLM(cfg, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10 + 1),
                                                  steps, learning_rate / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    result: dict = {"config": asdict(cfg), "parameters": int(n_params),
                    "train_rows": len(data.train_inputs), "val_rows": len(data.val_inputs),
                    "unigram_entropy": data.unigram_entropy,
                    "unigram_val_loss": data.unigram_val_loss, "train_loss": [], "val_loss": []}
    result["val_loss"].append((0, evaluate(model, data.val_inputs, data.val_targets, batch_size)))

    rng = np.random.default_rng(seed)
    timed_tokens, timed_seconds, window = 0, 0.0, []
    bar = tqdm(range(1, steps + 1), desc="tiny_lm", unit="step", disable=not progress)
    for step, idx in zip(bar, batches(len(data.train_inputs), batch_size, rng), strict=False):
        x, y = data.train_inputs[idx], data.train_targets[idx]
        t0 = time.perf_counter()
        loss = float(train_step(model, optimizer, x, y, z_loss=z_loss))
        if step > 1:  # the first step compiles
            timed_seconds += time.perf_counter() - t0
            timed_tokens += int((y != IGNORE).sum())
        window.append(loss)
        if step % eval_every == 0 or step == steps:
            result["train_loss"].append((step, float(np.mean(window))))
            window = []
            val = evaluate(model, data.val_inputs, data.val_targets, batch_size)
            result["val_loss"].append((step, val))
            bar.set_postfix(train=f"{result['train_loss'][-1][1]:.3f}", val=f"{val:.3f}")

    result["tokens_per_s"] = timed_tokens / max(timed_seconds, 1e-9)
    result["memory"] = loss_memory(batch_size * cfg.seq_len, cfg.d_model, cfg.vocab_size)
    result["sample"] = generate(model, data.vocab, "The", sample_tokens, seed=seed)
    result["wall_time_s"] = time.perf_counter() - start
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tiny_lm.json").write_text(json.dumps(result, indent=1))
    return result


def report(r: dict) -> str:
    """The human-readable summary that ``main`` prints."""
    m, c = r["memory"], r["config"]
    lines = [
        f"model: {r['parameters']:,} parameters, vocab {c['vocab_size']}, d_model "
        f"{c['d_model']}, {c['num_layers']} layers; {r['train_rows']} train rows, "
        f"{r['val_rows']} validation rows of {c['seq_len']} tokens",
        "loss: jaxent.linear_cross_entropy (tied head, ignore_index padding, z-loss)",
        *(f"step {s:5d}  train {t:.3f}  val {v:.3f}"
          for (s, t), (_, v) in zip(r["train_loss"], r["val_loss"][1:], strict=True)),
        f"validation loss {r['val_loss'][-1][1]:.3f} nats/token (untrained "
        f"{r['val_loss'][0][1]:.3f}); unigram entropy {r['unigram_entropy']:.3f} "
        f"(unigram model on validation {r['unigram_val_loss']:.3f}; "
        f"uniform {math.log(c['vocab_size']):.3f})",
        f"throughput: {r['tokens_per_s']:,.0f} non-pad tokens/s (training steps, compile excluded)",
        f"loss+grad temp memory: fused {m['fused_temp_mib']:.1f} MiB, naive head "
        f"{m['naive_temp_mib']:.1f} MiB (one f32 logits matrix: {m['logits_mib']:.1f} MiB)",
        f"sample: {r['sample']!r}",
        f"wall time {r['wall_time_s']:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry: parses options, trains, prints the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=600,
                        help="training steps; the default took about 17 minutes on 2 CPU cores "
                             "(--steps 100 --eval-every 50: about 3 minutes, 171 s)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--z-loss", type=float, default=1e-4,
                        help="z_loss coefficient of jaxent.linear_cross_entropy")
    parser.add_argument("--vocab-size", type=int, default=8192,
                        help="words in the vocabulary (the tied embedding's rows)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--d-model", type=int, default=128, help="width of the transformer")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads per block")
    parser.add_argument("--corpus", choices=("pydoc", "pydoc+stdlib"), default="pydoc+stdlib",
                        help="pydoc_data.topics alone, or with the standard library's docstrings")
    parser.add_argument("--eval-every", type=int, default=100,
                        help="steps between validation losses")
    parser.add_argument("--sample-tokens", type=int, default=40,
                        help="length of the generated sample printed at the end")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initialization and the batches")
    parser.add_argument("--out", default="out/tiny_lm", help="directory for tiny_lm.json")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    a = parser.parse_args(argv)
    cfg = Config(vocab_size=a.vocab_size, seq_len=a.seq_len, d_model=a.d_model,
                 num_layers=a.layers, num_heads=a.heads)
    result = train(steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr, z_loss=a.z_loss,
                   cfg=cfg, corpus=a.corpus, eval_every=a.eval_every,
                   sample_tokens=a.sample_tokens, seed=a.seed, out_dir=a.out,
                   progress=not a.no_progress)
    print(report(result))
    return result


if __name__ == "__main__":
    main()
