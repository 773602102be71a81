"""One process of the multi-process tests (started by tests/test_multiprocess.py).

Each process gets 4 simulated CPU devices and gloo CPU collectives, joins the others with
``jax.distributed.initialize`` on a loopback coordinator, and builds a ``data x model`` =
``num_processes x 4`` mesh over all devices (the data axis across processes, the model axis
within one). Inputs are made from process-local data
(``jax.make_array_from_process_local_data``): every process draws the same global NumPy
arrays from one seed and hands over its own rows.

Modes (``--mode``):

* ``check``: values and gradients of ``jaxent.cross_entropy`` on sharded logits and of
  ``jaxent.linear_cross_entropy`` in every placement (the ``jaxent.sharded`` shard_map API,
  plain ``jax.jit`` on Explicit and on Auto meshes), an FSDP kernel and a padded
  vocabulary, and an optax train step of a tiny LM head, each against the same numbers
  computed by this process alone on one device with the unsharded functions on the global
  NumPy data. Each passed check prints ``CHECK <name> ok``.
* ``train``: train steps in a loop (printing ``STEP <i>``) until killed or ``--timeout``;
  the failure tests kill one process and watch the other.

Failures never hang: ``jax.distributed.initialize`` gets an ``initialization_timeout`` and a
``heartbeat_timeout_seconds`` (a process whose peer stops sending heartbeats is terminated
by JAX with a message naming the peer), an exception (a collective whose peer is gone)
is printed with this process's id, its phase and the processes the coordination service
no longer counts alive, a non-coordinator process first checks that the coordinator's
port answers, and a watchdog thread ends the process with a message naming it and the
phase it was in once ``--timeout`` seconds have passed. (No thread polls the peers'
liveness: JAX's query for it is a barrier across processes, which a process that has
finished its work and left would turn into a false alarm in the other.)

    python tests/multiprocess_worker.py --process-id 0 --num-processes 2 \
        --coordinator 127.0.0.1:12345
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

LOCAL_DEVICES = 4
N, D, V = 16, 8, 64  # global tokens, hidden width, vocabulary (16 per model shard)
OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-3}
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    """The worker's command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--process-id", type=int, required=True, help="this process's id")
    p.add_argument("--num-processes", type=int, default=2, help="number of processes")
    p.add_argument("--coordinator", default="127.0.0.1:1234",
                   help="host:port of process 0's coordination service")
    p.add_argument("--mode", choices=("check", "train"), default="check",
                   help="what to run once connected")
    p.add_argument("--seed", type=int, default=0, help="seed of the global data")
    p.add_argument("--init-timeout", type=int, default=30,
                   help="seconds jax.distributed.initialize waits for every process")
    p.add_argument("--heartbeat-timeout", type=int, default=10,
                   help="seconds without a peer's heartbeat before JAX ends this process")
    p.add_argument("--timeout", type=float, default=150.0,
                   help="watchdog: seconds after which this process exits with an error")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- robustness


class Watchdog:
    """Ends the process (``os._exit(124)``) with a message naming it and its current phase
    when ``timeout`` seconds have passed since :meth:`start`."""

    def __init__(self, process_id: int, timeout: float):
        self.process_id, self.timeout, self.phase = process_id, timeout, "start"
        self._done = threading.Event()

    def start(self) -> Watchdog:
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def _watch(self) -> None:
        if not self._done.wait(self.timeout):
            print(f"[process {self.process_id}] watchdog: still in phase {self.phase!r} after "
                  f"{self.timeout:.0f} s; exiting", file=sys.stderr, flush=True)
            os._exit(124)

    def stop(self) -> None:
        self._done.set()


def dead_peers_note(args: argparse.Namespace) -> str:
    """``"; process(es) [..] not alive"`` once the coordination service knows (it waits up to
    ``--heartbeat-timeout`` + 5 s for that), or why it cannot say."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        return ""
    everyone = list(range(args.num_processes))
    deadline = time.monotonic() + args.heartbeat_timeout + 5
    while True:
        try:
            dead = sorted(set(everyone) - set(client.get_live_nodes(everyone)))
        except Exception as err:  # noqa: BLE001 - the service itself may be gone
            return (f"; the coordination service (in process 0) did not answer "
                    f"({type(err).__name__})")
        if dead:
            return f"; process(es) {dead} not alive"
        if time.monotonic() > deadline:
            return "; every process is still alive"
        time.sleep(0.5)


def wait_for_coordinator(address: str, timeout: float, process_id: int) -> None:
    """Return once ``address`` (``host:port``) accepts TCP connections; raise a
    ``ConnectionError`` naming the process and the address after ``timeout`` seconds."""
    host, port = address.rsplit(":", 1)
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as err:
            last = err
            time.sleep(0.2)
    raise ConnectionError(f"process {process_id}: the coordinator {address} (process 0) is not "
                          f"reachable after {timeout:.0f} s (last error: {last!r})")


def initialize(args: argparse.Namespace) -> None:
    """Configure 4 CPU devices and gloo collectives, then join the other processes."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.process_id != 0:
        wait_for_coordinator(args.coordinator, args.init_timeout, args.process_id)
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id, initialization_timeout=args.init_timeout,
        heartbeat_timeout_seconds=args.heartbeat_timeout)
    if jax.process_count() != args.num_processes or jax.local_device_count() != LOCAL_DEVICES:
        raise RuntimeError(f"process {args.process_id}: expected {args.num_processes} processes "
                           f"x {LOCAL_DEVICES} devices, got {jax.process_count()} x "
                           f"{jax.local_device_count()}")


# -------------------------------------------------------------------------------- data


def make_mesh(axis_type):
    """The ``data x model`` mesh: row ``p`` holds process ``p``'s devices."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    grid = np.asarray(devices).reshape(jax.process_count(), LOCAL_DEVICES)
    return Mesh(grid, ("data", "model"), axis_types=(axis_type, axis_type))


def draw(seed: int) -> dict:
    """The global NumPy inputs (identical in every process): hidden, kernel, bias, labels
    (two ignored), class weights and logits."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, D)).astype(np.float32)
    k = (rng.normal(size=(D, V)) / 2).astype(np.float32)
    b = rng.normal(size=(V,)).astype(np.float32)
    y = rng.integers(0, V, size=(N,)).astype(np.int32)
    y[rng.choice(N, size=2, replace=False)] = -100
    w = rng.uniform(0.5, 2.0, size=(V,)).astype(np.float32)
    x = (rng.normal(size=(N, V)) * 2).astype(np.float32)
    return {"hidden": h, "kernel": k, "bias": b, "labels": y, "weight": w, "logits": x}


def place(mesh, value, *spec):
    """A global array sharded as ``spec`` over ``mesh``, made from this process's part of
    ``value`` (the rows of its ``data`` index when the first axis is over ``data``)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(mesh, P(*spec))
    local = value
    if spec and spec[0] == "data":
        rows = value.shape[0] // mesh.shape["data"]
        start = jax.process_index() * rows
        local = value[start:start + rows]
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), value.shape)


# ------------------------------------------------------------------------------ checks


def assert_matches(name: str, got, want) -> None:
    """``got`` (a pytree of global arrays: (loss, grads)) equals ``want`` (the same tree of
    NumPy arrays) on this process's shards: the loss to ``LOSS_RTOL``, the rest to
    ``GRAD_RTOL``."""
    import jax
    import numpy as np

    leaves_got, leaves_want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(leaves_got) == len(leaves_want), (name, len(leaves_got), len(leaves_want))
    for i, (g, w) in enumerate(zip(leaves_got, leaves_want, strict=True)):
        rtol = LOSS_RTOL if i == 0 else GRAD_RTOL
        w = np.asarray(w)
        for shard in g.addressable_shards:
            np.testing.assert_allclose(np.asarray(shard.data), w[shard.index], rtol=rtol,
                                       atol=rtol * 1e-1 * float(np.abs(w).max()),
                                       err_msg=f"{name}: output {i}, shard {shard.index}")
    print(f"CHECK {name} ok", flush=True)


def check_cross_entropy(data: dict) -> None:
    """jaxent.cross_entropy on logits sharded (tokens x vocabulary): the shard_map API,
    the per-shard function in our own shard_map, and plain jit on Explicit and Auto meshes."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    import jaxent

    x, y, w = data["logits"], data["labels"], data["weight"]
    opts = dict(OPTIONS, weight=w)
    want = jax.jit(jax.value_and_grad(lambda x: jaxent.cross_entropy(x, y, **opts)))(x)

    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = make_mesh(axis_type)
        xs, ys = place(mesh, x, "data", "model"), place(mesh, y, "data")
        api = jax.jit(jax.value_and_grad(lambda x, y, mesh=mesh: jaxent.sharded.shard_cross_entropy(
            x, y, mesh=mesh, vocab_axis="model", token_axis="data", **opts)))
        assert_matches(f"shard_cross_entropy/{axis_type.name}", api(xs, ys), want)

        def per_shard(x, y):
            return jaxent.sharded.cross_entropy(x, y, axis_name="model", token_axis_name="data",
                                                weight=jnp.asarray(w), **OPTIONS)

        own = jax.jit(jax.value_and_grad(jax.shard_map(
            per_shard, mesh=mesh, in_specs=(P("data", "model"), P("data")), out_specs=P())))
        assert_matches(f"sharded.cross_entropy in shard_map/{axis_type.name}", own(xs, ys),
                       want)
        plain = jax.jit(jax.value_and_grad(lambda x, y: jaxent.cross_entropy(x, y, **opts)))
        with jax.set_mesh(mesh):
            got = plain(xs, ys)
        assert got[1].sharding.spec == P("data", "model"), got[1].sharding
        assert_matches(f"plain jit cross_entropy/{axis_type.name}", got, want)
        # Eagerly, on global arrays (their labels cannot be read on one host: not checked).
        with jax.set_mesh(mesh):
            eager = jaxent.cross_entropy(xs, ys, **opts)
        assert_matches(f"eager cross_entropy/{axis_type.name}", (eager,), (want[0],))


def _mixed_reductions(loss_fn):
    """A scalar mixing ``"mean"`` and ``"none"`` (per-token weights ``cot``, an argument:
    a global array cannot be closed over): both block schedules."""
    import jax.numpy as jnp

    def fn(h, k, b, y, cot):
        mean = loss_fn(h, k, b, y, reduction="mean")
        return mean + jnp.sum(cot * loss_fn(h, k, b, y, reduction="none"))

    return fn


def check_linear(data: dict) -> None:
    """jaxent.linear_cross_entropy (values and gradients w.r.t. hidden, kernel and bias) in
    every placement against the dense one-device loss on the global data."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    import jaxent

    h, k, b, y, w = (data[n] for n in ("hidden", "kernel", "bias", "labels", "weight"))
    cot = np.random.default_rng(1).normal(size=(N,)).astype(np.float32)
    opts = dict(OPTIONS, weight=w)
    grads = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))  # noqa: E731

    def dense(h, k, b, y, **kw):
        return jaxent.cross_entropy(h @ k + b[None, :], y, **opts, **kw)

    want = grads(_mixed_reductions(dense))(h, k, b, y, cot)

    def fused(h, k, b, y, **kw):
        return jaxent.linear_cross_entropy(h, k, y, bias=b, block_size=8, **opts, **kw)

    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = make_mesh(axis_type)
        args = (place(mesh, h, "data"), place(mesh, k, None, "model"),
                place(mesh, b, "model"), place(mesh, y, "data"))
        cs = place(mesh, cot, "data")

        def api(h, k, b, y, mesh=mesh, **kw):
            return jaxent.sharded.shard_linear_cross_entropy(
                h, k, y, bias=b, mesh=mesh, vocab_axis="model", token_axis="data",
                block_size=4, **opts, **kw)

        assert_matches(f"shard_linear_cross_entropy/{axis_type.name}",
                       grads(_mixed_reductions(api))(*args, cs), want)

        def own(h, k, b, y, mesh=mesh, reduction="mean"):
            def per_shard(h, k, b, y):
                return jaxent.sharded.linear_cross_entropy(
                    h, k, y, bias=b, axis_name="model", token_axis_name="data",
                    weight=jnp.asarray(w), reduction=reduction, block_size=4, **OPTIONS)

            out = P() if reduction != "none" else P("data")
            return jax.shard_map(per_shard, mesh=mesh, out_specs=out, in_specs=(
                P("data"), P(None, "model"), P("model"), P("data")))(h, k, b, y)

        assert_matches(f"sharded.linear_cross_entropy in shard_map/{axis_type.name}",
                       grads(_mixed_reductions(own))(*args, cs), want)
        with jax.set_mesh(mesh):
            got = grads(_mixed_reductions(fused))(*args, cs)
        for g, a in zip(got[1], args, strict=False):
            assert g.sharding.is_equivalent_to(a.sharding, a.ndim), (g.sharding, a.sharding)
        assert_matches(f"plain jit linear_cross_entropy/{axis_type.name}", got, want)


def check_layouts(data: dict) -> None:
    """Across processes: FSDP (the kernel's D sharded over the cross-process ``data`` axis,
    its vocabulary over ``model``; plain jit, Explicit mesh) and a padded vocabulary (the
    kernel's 64 columns hold ``V - 3`` classes; the shard_map API with ``vocab_size``)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType

    import jaxent

    h, k, b, y = (data[n] for n in ("hidden", "kernel", "bias", "labels"))
    mesh = make_mesh(AxisType.Explicit)
    grads = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))  # noqa: E731

    def dense(h, k, b, y):
        return jaxent.cross_entropy(h @ k + b[None, :], y, **OPTIONS)

    want = grads(dense)(h, k, b, y)
    args = (place(mesh, h, "data"), place(mesh, k, "data", "model"), place(mesh, b, "model"),
            place(mesh, y, "data"))
    with jax.set_mesh(mesh):
        got = grads(lambda h, k, b, y: jaxent.linear_cross_entropy(
            h, k, y, bias=b, block_size=8, **OPTIONS))(*args)
    assert got[1][1].sharding.is_equivalent_to(args[1].sharding, 2), got[1][1].sharding
    assert_matches("fsdp plain jit linear_cross_entropy/Explicit", got, want)

    real = V - 3
    y_real = np.where(y >= real, real - 1, y).astype(np.int32)
    k_junk, b_junk = k.copy(), b.copy()
    k_junk[:, real:], b_junk[real:] = 1e3, 1e4  # padding columns hold anything
    ref = grads(dense)(h, k[:, :real], b[:real], y_real)
    args = (place(mesh, h, "data"), place(mesh, k_junk, None, "model"),
            place(mesh, b_junk, "model"), place(mesh, y_real, "data"))
    got = grads(lambda h, k, b, y: jaxent.sharded.shard_linear_cross_entropy(
        h, k, y, bias=b, mesh=mesh, token_axis="data", vocab_size=real, block_size=4,
        **OPTIONS))(*args)
    dk, db = (np.asarray(multihost_utils.process_allgather(g, tiled=True))
              for g in got[1][1:])
    assert not dk[:, real:].any() and not db[real:].any(), "padding columns got gradients"
    padded_ref = (ref[0], (ref[1][0], np.pad(np.asarray(ref[1][1]), ((0, 0), (0, 3))),
                           np.pad(np.asarray(ref[1][2]), (0, 3))))
    assert_matches("padded vocabulary shard_linear_cross_entropy/Explicit", got, padded_ref)


def lm_head_init(seed: int, d_in: int = D, d: int = D, v: int = V) -> dict:
    """Parameters of a tiny LM head: ``hidden = tanh(x @ proj)``, logits ``hidden @ kernel``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"proj": (rng.normal(size=(d_in, d)) / np.sqrt(d_in)).astype(np.float32),
            "kernel": (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)}


def lm_head_loss(params, x, y, *, fused: bool = True):
    """Mean token loss of the LM head (fused loss, or the dense reference)."""
    import jax.numpy as jnp

    import jaxent

    hidden = jnp.tanh(x @ params["proj"])
    if fused:
        return jaxent.linear_cross_entropy(hidden, params["kernel"], y, **OPTIONS)
    return jaxent.cross_entropy(hidden @ params["kernel"], y, **OPTIONS)


def train_steps(params, x, y, steps: int, *, fused: bool = True, mesh=None):
    """``steps`` adam steps; returns the losses and the final parameters."""
    import contextlib
    import functools

    import jax
    import optax

    opt = optax.adam(3e-2)

    @jax.jit
    def step(params, state, x, y):  # x, y are arguments: global arrays cannot be closed over
        loss, g = jax.value_and_grad(functools.partial(lm_head_loss, fused=fused))(params, x, y)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = opt.init(params)
    losses = []
    for _ in range(steps):
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            params, state, loss = step(params, state, x, y)
        losses.append(loss)
    return losses, params


def check_train(data: dict, steps: int = 3) -> None:
    """An optax train step of the tiny LM head with the kernel's vocabulary over ``model``
    and the tokens over ``data`` (plain jit, Explicit and Auto meshes) against the same steps
    on one device with the dense loss: every step's loss and the final parameters."""
    import jax
    import numpy as np
    from jax.sharding import AxisType

    params = lm_head_init(7)
    x, y = data["logits"][:, :D], data["labels"]
    want_losses, want_params = train_steps(params, x, y, steps, fused=False)
    want = (np.asarray(want_losses), jax.tree.map(np.asarray, want_params))
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = make_mesh(axis_type)
        ps = {"proj": place(mesh, params["proj"]),
              "kernel": place(mesh, params["kernel"], None, "model")}
        losses, got_params = train_steps(ps, place(mesh, x, "data"), place(mesh, y, "data"),
                                         steps, mesh=mesh)
        assert got_params["kernel"].sharding.is_equivalent_to(ps["kernel"].sharding, 2)
        got_losses = np.asarray([float(loss) for loss in losses])
        np.testing.assert_allclose(got_losses, want[0], rtol=LOSS_RTOL,
                                   err_msg=f"train/{axis_type.name}: losses")
        assert got_losses[-1] < got_losses[0], got_losses
        for name in params:
            for shard in got_params[name].addressable_shards:
                np.testing.assert_allclose(np.asarray(shard.data),
                                           want[1][name][shard.index], rtol=GRAD_RTOL,
                                           atol=1e-6,
                                           err_msg=f"train/{axis_type.name}: {name}")
        print(f"CHECK train/{axis_type.name} ok losses {np.round(got_losses, 5).tolist()}",
              flush=True)


def train_forever(data: dict, watchdog: Watchdog) -> None:
    """Sharded train steps in a loop, printing ``STEP <i>`` after each (the failure tests
    kill a process in the middle)."""
    import jax
    from jax.sharding import AxisType

    mesh = make_mesh(AxisType.Explicit)
    params = lm_head_init(7)
    ps = {"proj": place(mesh, params["proj"]),
          "kernel": place(mesh, params["kernel"], None, "model")}
    x, y = place(mesh, data["logits"][:, :D], "data"), place(mesh, data["labels"], "data")
    i = 0
    while True:
        watchdog.phase = f"train step {i}"
        losses, ps = train_steps(ps, x, y, 1, mesh=mesh)
        jax.block_until_ready(losses)
        print(f"STEP {i} loss {float(losses[0]):.5f}", flush=True)
        i += 1


def main(argv=None) -> int:
    """Run the worker; on any failure print it with this process's id and phase, exit 1."""
    args = parse_args(argv)
    watchdog = Watchdog(args.process_id, args.timeout).start()
    try:
        return run(args, watchdog)
    except BaseException as err:
        # ``str`` of a JaxRuntimeError raised by a failed collective can block: use its args.
        what = err.args[0] if err.args else ""
        print(f"[process {args.process_id}] failed in phase {watchdog.phase!r}: "
              f"{type(err).__name__}: {what}{dead_peers_note(args)}", file=sys.stderr,
              flush=True)
        # Exit now: JAX's exit handlers would wait on the collective that failed.
        os._exit(1)


def run(args: argparse.Namespace, watchdog: Watchdog) -> int:
    """Initialize, then run ``args.mode``."""
    t0 = time.monotonic()
    watchdog.phase = "jax.distributed.initialize"
    initialize(args)
    print(f"INITIALIZED process {args.process_id} of {args.num_processes} "
          f"({time.monotonic() - t0:.1f} s)", flush=True)
    data = draw(args.seed)
    if args.mode == "train":
        train_forever(data, watchdog)
    for name, check in (("cross_entropy", check_cross_entropy), ("linear", check_linear),
                        ("layouts", check_layouts), ("train", check_train)):
        watchdog.phase = f"check {name}"
        check(data)
    watchdog.stop()
    print(f"WORKER {args.process_id} OK ({time.monotonic() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
