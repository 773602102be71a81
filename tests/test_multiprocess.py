"""Several processes on localhost: the sharded losses under ``jax.distributed``.

Each test starts processes of ``tests/multiprocess_worker.py`` (4 simulated CPU devices
each, gloo collectives, a loopback coordinator on a free port) and waits for them with a
deadline; on failure the assertion shows every process's exit status, stdout and stderr.

* two processes check values and gradients of the losses in every placement, an FSDP
  kernel and a padded vocabulary, and an optax train step against one-device numbers
  computed on the global data;
* killing one of two training processes (either) makes the other exit with an error naming
  the dead process, well within 60 s;
* a process whose coordinator does not answer exits with an error naming the address;
* ``examples/multihost_lm_head.py --num-processes 2`` trains and evaluates.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "multiprocess_worker.py"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it: bind to 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    """The environment of a worker: this checkout first on the path, CPU only, and no
    device-count flag of the parent (each worker sets its own 4 devices)."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   env.get("XLA_FLAGS", "")).strip()
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
                   os.pathsep))
    return env


class Procs:
    """Started processes whose stdout and stderr go to files in ``tmp``."""

    def __init__(self, tmp: pathlib.Path, commands: list[list[str]]):
        self.tmp, self.t0, self.procs = tmp, time.monotonic(), []
        for i, cmd in enumerate(commands):
            out, err = open(tmp / f"p{i}.out", "w"), open(tmp / f"p{i}.err", "w")  # noqa: SIM115
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stdout=out,
                                               stderr=err, stdin=subprocess.DEVNULL))
        self.exit_time = [None] * len(commands)

    def stdout(self, i: int) -> str:
        """Process ``i``'s stdout so far."""
        return (self.tmp / f"p{i}.out").read_text()

    def stderr(self, i: int) -> str:
        """Process ``i``'s stderr so far."""
        return (self.tmp / f"p{i}.err").read_text()

    def poll(self) -> None:
        """Record the time at which each process was first seen to have exited."""
        for i, p in enumerate(self.procs):
            if p.poll() is not None and self.exit_time[i] is None:
                self.exit_time[i] = time.monotonic() - self.t0

    def wait_for(self, cond, timeout: float) -> bool:
        """Poll until ``cond()`` holds or ``timeout`` seconds pass; whether it held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if cond():
                return True
            time.sleep(0.2)
        self.poll()
        return cond()

    def wait_all(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every process to exit; whether they did."""
        return self.wait_for(lambda: all(p.poll() is not None for p in self.procs), timeout)

    def kill_all(self) -> None:
        """Kill the processes still running (each by its own Popen handle)."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)

    def report(self) -> str:
        """Every process's exit status, time, stdout and stderr tail (for assertion messages)."""
        self.poll()
        parts = []
        for i, p in enumerate(self.procs):
            err = "\n".join(line for line in self.stderr(i).splitlines() if "[Gloo]" not in line)
            parts.append(f"--- process {i}: returncode {p.returncode}, exited at "
                         f"{self.exit_time[i]} s\n[stdout]\n{self.stdout(i)[-4000:]}\n"
                         f"[stderr]\n{err[-6000:]}")
        return "\n".join(parts)


def worker_command(process_id: int, port: int, *extra: str, num_processes: int = 2) -> list[str]:
    """The command line of worker ``process_id`` with a loopback coordinator on ``port``."""
    return [sys.executable, str(WORKER), "--process-id", str(process_id), "--num-processes",
            str(num_processes), "--coordinator", f"127.0.0.1:{port}", *extra]


@pytest.fixture
def launch(tmp_path):
    """``launch(commands)`` starts them; every process still running at teardown is killed."""
    started = []

    def start(commands):
        started.append(Procs(tmp_path, commands))
        return started[-1]

    yield start
    for procs in started:
        procs.kill_all()


CHECKS = [f"{what}/{axis}" for what in (
    "shard_cross_entropy", "sharded.cross_entropy in shard_map", "plain jit cross_entropy",
    "eager cross_entropy", "shard_linear_cross_entropy",
    "sharded.linear_cross_entropy in shard_map", "plain jit linear_cross_entropy", "train")
    for axis in ("Explicit", "Auto")] + [
    "fsdp plain jit linear_cross_entropy/Explicit",
    "padded vocabulary shard_linear_cross_entropy/Explicit"]


def test_two_processes_match_one_device(launch):
    """2 processes x 4 devices, a data x model = 2 x 4 mesh: every check of the worker
    (values and gradients of each placement, an optax train step) passes on both processes
    against the one-device numbers, within 150 s."""
    port = free_port()
    procs = launch([worker_command(i, port, "--timeout", "140") for i in range(2)])
    finished = procs.wait_all(timeout=150)
    assert finished, "workers still running after 150 s\n" + procs.report()
    for i, p in enumerate(procs.procs):
        assert p.returncode == 0, procs.report()
        out = procs.stdout(i)
        for name in CHECKS:
            assert f"CHECK {name} ok" in out, (name, procs.report())
        assert f"WORKER {i} OK" in out, procs.report()


# What the survivor's stderr says, by the id of the killed process: the worker's report of
# the failed collective (with the coordination service's list of dead processes), or JAX's
# own termination message (the tasks that stopped sending heartbeats; the leader's death).
SURVIVOR_SAYS = {
    1: r"\[process 0\] failed .*process\(es\) \[1\] not alive"
       r"|stopped sending heartbeats\):\s*1\b",
    0: r"leader task was preempted/died|\[process 1\] failed .*process\(es\) \[0\] not alive"
       r"|the coordination service \(in process 0\) did not answer",
}


@pytest.mark.parametrize("killed", [1, 0])
def test_killed_worker_makes_the_other_exit_with_a_clear_error(launch, killed):
    """One of two training processes is killed (SIGKILL) after a few steps: the other exits
    with a non-zero status within 60 s, its stderr naming the dead process. Process 1's
    death is noticed by the coordination service (``heartbeat_timeout_seconds=10``): JAX
    ends process 0 naming the task that stopped sending heartbeats, or, when a collective
    fails first, the worker reports the failure with the service's list of dead processes;
    process 0's death takes the coordination service with it, and JAX ends process 1
    saying the leader died."""
    port = free_port()
    procs = launch([worker_command(i, port, "--mode", "train", "--heartbeat-timeout", "10",
                                   "--timeout", "120") for i in range(2)])
    started = procs.wait_for(lambda: "STEP 2 " in procs.stdout(killed), timeout=90)
    assert started, f"process {killed} did not reach train step 2\n" + procs.report()
    procs.procs[killed].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor = procs.procs[1 - killed]
    exited = procs.wait_for(lambda: survivor.poll() is not None, timeout=60)
    elapsed = time.monotonic() - killed_at
    assert exited, f"process {1 - killed} still running 60 s after {killed} died\n" + (
        procs.report())
    assert survivor.returncode != 0, procs.report()
    assert re.search(SURVIVOR_SAYS[killed], procs.stderr(1 - killed)), procs.report()
    print(f"process {1 - killed} exited {elapsed:.1f} s after process {killed} was killed, "
          f"status {survivor.returncode}")


def test_unreachable_coordinator_is_a_clear_error(launch):
    """Process 1 alone, its coordinator's port closed: it exits within its
    ``--init-timeout`` with a ConnectionError naming itself and the address."""
    port = free_port()
    procs = launch([worker_command(1, port, "--init-timeout", "5", "--timeout", "60")])
    assert procs.wait_all(timeout=60), procs.report()
    assert procs.procs[0].returncode != 0, procs.report()
    err = procs.stderr(0)
    assert "ConnectionError" in err, procs.report()
    assert f"process 1: the coordinator 127.0.0.1:{port} (process 0) is not reachable" in err, (
        procs.report())
    assert procs.exit_time[0] < 30, procs.report()


def test_multihost_example_runs_with_two_local_processes(tmp_path):
    """``examples/multihost_lm_head.py --num-processes 2`` spawns its processes, trains, and
    its evaluation equals the one-device loss (the script checks it and exits 0)."""
    cmd = [sys.executable, str(ROOT / "examples" / "multihost_lm_head.py"),
           "--num-processes", "2", "--steps", "4", "--timeout", "120"]
    proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True,
                          timeout=150, check=False)
    report = f"status {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, report
    for i in range(2):
        assert f"[process {i}/2] eval loss" in proc.stdout, report
        assert re.search(rf"\[process {i}/2\] eval loss [\d.]+ matches one device",
                         proc.stdout), report
        losses = [float(v) for v in re.findall(rf"\[process {i}/2\] step \d+ loss ([\d.]+)",
                                               proc.stdout)]
        assert len(losses) == 4 and losses[-1] < losses[0], report
