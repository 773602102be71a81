"""A language-model head trained across processes: ``jax.distributed`` + a data x model mesh.

The same code runs on one machine with N local processes and on N hosts. Each process
joins the others (``jax.distributed.initialize``), the mesh is ``data x model`` =
``processes x devices per process`` (the vocabulary within a host, the batch across
hosts), every process feeds only its own part of each batch
(``jax.make_array_from_process_local_data``), and the train step is a plain ``jax.jit`` of
``jaxent.linear_cross_entropy``: on a mesh with explicit axes the loss reads its split from
the arrays' shardings, walks each device's vocabulary slice in blocks and never builds the
``[tokens, vocab]`` logits. The task is synthetic (the next token is a fixed function of the
current one), so the loss must fall; at the end the evaluation loss on a fixed batch is
checked against the same numbers computed by one process on one device.

Launch, N local processes (the script starts them itself, 4 simulated CPU devices each,
coordinator on a free loopback port)::

    python examples/multihost_lm_head.py --num-processes 2

On N hosts, the same command on each host ``i`` with its id and the coordinator's address
(host 0's, reachable from all; ``--local-devices 0`` uses the host's own accelerators)::

    python examples/multihost_lm_head.py --num-processes N --process-id i \\
        --coordinator 10.0.0.1:1234 --local-devices 0

One process alone (no ``jax.distributed``)::

    python examples/multihost_lm_head.py

A process whose peer dies exits with JAX's error naming the dead process (after
``--heartbeat-timeout`` seconds); a watchdog ends any process still running after
``--timeout`` seconds, and the local launcher reports each process's exit status.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

EVAL_STEP = 10**9  # the "step" whose batch is the evaluation batch


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``--help`` lists every option with its default)."""
    p = argparse.ArgumentParser(
        description="Train a vocabulary-parallel LM head over a data x model mesh spanning "
        "processes (see the module docstring for launch commands).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-processes", type=int, default=1,
                   help="number of processes; without --process-id, >1 starts them locally")
    p.add_argument("--process-id", type=int, default=None,
                   help="this process's id in [0, num-processes) (one per host)")
    p.add_argument("--coordinator", default="127.0.0.1:0",
                   help="host:port of process 0's coordination service (port 0: a free "
                   "loopback port, local launch only)")
    p.add_argument("--local-devices", type=int, default=4,
                   help="simulated CPU devices per process (0: the platform's real devices)")
    p.add_argument("--steps", type=int, default=20, help="adam steps")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=16, help="tokens per sequence")
    p.add_argument("--dim", type=int, default=32, help="hidden width")
    p.add_argument("--vocab", type=int, default=512,
                   help="vocabulary size (divisible by the devices per process)")
    p.add_argument("--lr", type=float, default=3e-2, help="adam learning rate")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--z-loss", type=float, default=1e-4, help="z-loss coefficient")
    p.add_argument("--seed", type=int, default=0, help="seed of parameters and data")
    p.add_argument("--init-timeout", type=int, default=60,
                   help="seconds jax.distributed.initialize waits for all processes")
    p.add_argument("--heartbeat-timeout", type=int, default=10,
                   help="seconds without a peer's heartbeat before a process gives up")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds after which every process (and the local launcher) gives up")
    args = p.parse_args(argv)
    if args.num_processes < 1:
        p.error(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and not 0 <= args.process_id < args.num_processes:
        p.error(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
    return args


# ------------------------------------------------------------------ one process's work


def setup(args: argparse.Namespace) -> None:
    """Configure the devices and join the other processes (if any)."""
    import jax

    if args.local_devices > 0:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.local_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes,
            process_id=args.process_id, initialization_timeout=args.init_timeout,
            heartbeat_timeout_seconds=args.heartbeat_timeout)


def make_mesh():
    """``data x model``: one row of the mesh per process, its local devices along ``model``."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    grid = np.asarray(devices).reshape(jax.process_count(), jax.local_device_count())
    return Mesh(grid, ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def next_tokens(tokens, vocab: int):
    """The synthetic task: the token after ``t`` is ``(7 t + 3) mod vocab``."""
    return (7 * tokens + 3) % vocab


def local_batch(args, step: int, process: int, processes: int):
    """This process's rows of batch ``step``: ``(tokens, targets)``, ``[batch/processes,
    seq_len]`` int32 (each process would read its own data shard)."""
    import numpy as np

    rng = np.random.default_rng((args.seed, step, process))
    tokens = rng.integers(0, args.vocab, size=(args.batch // processes, args.seq_len))
    targets = next_tokens(tokens, args.vocab)
    targets[:, -1] = -100  # a padded position per row: ignored
    return tokens.astype(np.int32), targets.astype(np.int32)


def global_batch(mesh, arrays):
    """Global ``[batch, seq_len]`` arrays over ``data`` from this process's rows."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(mesh, P("data"))
    n = mesh.shape["data"]
    return tuple(jax.make_array_from_process_local_data(
        sharding, a, (a.shape[0] * n, *a.shape[1:])) for a in arrays)


def init_params(args, mesh):
    """``{"embed": [V, D] (replicated), "kernel": [D, V] (vocabulary over model)}``, made
    by the same jitted program on every process (same key: same parameters)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def init(key):
        ke, kk = jax.random.split(key)
        return {"embed": jax.random.normal(ke, (args.vocab, args.dim)),
                "kernel": jax.random.normal(kk, (args.dim, args.vocab)) / args.dim ** 0.5}

    shardings = {"embed": NamedSharding(mesh, P()),
                 "kernel": NamedSharding(mesh, P(None, "model"))}
    return jax.jit(init, out_shardings=shardings)(jax.random.key(args.seed))


def loss_fn(params, tokens, targets, options):
    """Mean next-token loss: ``hidden = embed[tokens]``, fused head + cross-entropy."""
    from jax.sharding import PartitionSpec as P

    import jaxent

    # [B, T, D], the batch over data (an explicit mesh asks where a gather's result goes)
    hidden = params["embed"].at[tokens].get(out_sharding=P("data"))
    return jaxent.linear_cross_entropy(hidden, params["kernel"], targets, **options)


def reference_loss(params, tokens, targets, options) -> float:
    """The same loss on one device: dense logits, unsharded NumPy inputs."""
    import jax
    import jax.numpy as jnp

    import jaxent

    dev = jax.local_devices()[0]
    p = jax.device_put(params, dev)
    logits = p["embed"][jnp.asarray(tokens)] @ p["kernel"]
    return float(jaxent.cross_entropy(logits, jax.device_put(targets, dev), **options))


def run(args: argparse.Namespace) -> dict:
    """Train and evaluate in this process (one of ``args.num_processes``)."""
    import jax
    import numpy as np
    import optax
    from jax.experimental import multihost_utils

    setup(args)
    me, n = jax.process_index(), jax.process_count()
    tag = f"[process {me}/{n}]"
    mesh = make_mesh()
    if args.batch % n or args.vocab % mesh.shape["model"]:
        raise ValueError(f"--batch ({args.batch}) must be divisible by the processes ({n}) "
                         f"and --vocab ({args.vocab}) by the devices per process "
                         f"({mesh.shape['model']})")
    print(f"{tag} {jax.device_count()} devices, mesh {dict(mesh.shape)}", flush=True)
    options = {"label_smoothing": args.label_smoothing, "z_loss": args.z_loss}
    params = init_params(args, mesh)
    opt = optax.adam(args.lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets, options)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    with jax.set_mesh(mesh):
        for i in range(args.steps):
            tokens, targets = global_batch(mesh, local_batch(args, i, me, n))
            params, state, loss = step(params, state, tokens, targets)
            losses.append(float(loss))  # replicated: every process holds the value
            print(f"{tag} step {i} loss {losses[-1]:.5f}", flush=True)
        # Evaluation on a fixed batch (one no train step draws); each process feeds its rows.
        eval_rows = local_batch(args, EVAL_STEP, me, n)
        tokens, targets = global_batch(mesh, eval_rows)
        evaluate = jax.jit(lambda p, t, y: loss_fn(p, t, y, options))
        got = float(evaluate(params, tokens, targets))
    # The one-device check: every process gathers the parameters and the whole eval batch.
    full = multihost_utils.process_allgather(params, tiled=True)
    every = [local_batch(args, EVAL_STEP, p, n) for p in range(n)]
    want = reference_loss(full, np.concatenate([t for t, _ in every]),
                          np.concatenate([y for _, y in every]), options)
    if not np.isclose(got, want, rtol=1e-5, atol=0):
        raise AssertionError(f"{tag} eval loss {got} differs from one device's {want}")
    if args.steps > 1 and not losses[-1] < losses[0]:
        raise AssertionError(f"{tag} the loss did not fall: {losses}")
    print(f"{tag} eval loss {got:.6f} matches one device ({want:.6f})", flush=True)
    return {"losses": losses, "eval_loss": got, "reference_eval_loss": want}


class Watchdog:
    """Ends this process (status 124) with a message once ``timeout`` seconds have passed."""

    def __init__(self, name: str, timeout: float):
        self._done = threading.Event()
        threading.Thread(target=self._watch, args=(name, timeout), daemon=True).start()

    def _watch(self, name: str, timeout: float) -> None:
        if not self._done.wait(timeout):
            print(f"{name}: still running after {timeout:.0f} s (--timeout); exiting",
                  file=sys.stderr, flush=True)
            os._exit(124)

    def stop(self) -> None:
        self._done.set()


# --------------------------------------------------------------- the local launcher


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the OS picks one for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(stream, out) -> None:
    """Copy a child's output lines to ours (gloo's connection chatter left out)."""
    for line in stream:
        if "[Gloo]" not in line:
            out.write(line)
            out.flush()


def _describe(code: int) -> str:
    """How a child process ended, from its return code."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def launch_local(args: argparse.Namespace, argv: list[str]) -> int:
    """Start ``args.num_processes`` copies of this script on this machine (the same
    arguments plus ``--process-id i`` and a loopback coordinator), forward their output and
    return 0 when all succeed. When one fails, the others get ``--heartbeat-timeout`` plus
    30 s to notice and exit by themselves before they are killed; every failure is reported
    with the process's id and how it ended."""
    host, port = args.coordinator.rsplit(":", 1)
    address = f"{host}:{free_port() if port == '0' else port}"
    procs = []
    for i in range(args.num_processes):
        cmd = [sys.executable, "-u", os.path.abspath(__file__), *argv,
               "--process-id", str(i), "--coordinator", address]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL)
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            threading.Thread(target=_forward, args=(stream, out), daemon=True).start()
        procs.append(p)
    print(f"launched {args.num_processes} processes, coordinator {address}", flush=True)
    t0 = time.monotonic()
    deadline, failed = t0 + args.timeout, []
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        newly = [i for i, p in enumerate(procs) if p.poll() not in (None, 0) and i not in failed]
        for i in newly:
            print(f"launcher: process {i} failed ({_describe(procs[i].returncode)}) after "
                  f"{time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
            failed.append(i)
            deadline = min(deadline, time.monotonic() + args.heartbeat_timeout + 30)
        time.sleep(0.1)
    status = 0
    for i, p in enumerate(procs):
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
            print(f"launcher: process {i} still running after "
                  f"{time.monotonic() - t0:.1f} s: killed", file=sys.stderr, flush=True)
        if p.returncode != 0:
            if i not in failed:
                print(f"launcher: process {i} failed ({_describe(p.returncode)})",
                      file=sys.stderr, flush=True)
            status = 1
    time.sleep(0.2)  # let the forwarding threads drain
    return status


def main(argv: list[str] | None = None) -> int:
    """Launch the local processes, or run this one (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.num_processes > 1 and args.process_id is None:
        return launch_local(args, argv)
    if args.num_processes > 1 and args.coordinator.endswith(":0"):
        raise SystemExit("--coordinator needs a port when --process-id is given")
    watchdog = Watchdog(f"process {args.process_id or 0}", args.timeout)
    run(args)
    watchdog.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
