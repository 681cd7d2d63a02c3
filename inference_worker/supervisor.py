"""`inference-worker run --replicas N [--gpus 0,1,...]`: one worker process per slot.

Slots: `--gpus G` alone gives one slot per listed GPU; `--replicas N` alone gives N slots
on whatever devices the children see; both give N slots per GPU (slot `i` on GPU
`G[i // N]`). Each child is `python -m inference_worker.cli run <same flags>` with

- `IW_WORKER__NAME=<name>-<slot>` (`<name>` = `worker.name`, else the host name),
- `CUDA_VISIBLE_DEVICES=<gpu>` in its environment from exec on, i.e. before anything in
  it can import a runtime (so inside the child the GPU is `cuda:0`),
- `--metrics-port <metrics.port + slot>` (port 0 stays 0: each child picks a free one).

Crashes: a child that exits on its own is restarted after a backoff that doubles from
1 s up to 30 s and resets once a child has run for 60 s. A child that exits with status
2 (configuration error, which a restart cannot fix) is not restarted; the supervisor keeps
the other slots and exits 2 when it stops. It never gives up on other crashes (the same
policy as a Kubernetes CrashLoopBackOff): the children's logs say why they crash.

Shutdown: SIGTERM or SIGINT is forwarded (as SIGTERM) to every child, which drains; the
supervisor waits up to `worker.drain_timeout_s` + 10 s, then SIGKILLs what is left. Exit
status: 0 when every child exited 0, 2 after a configuration error, 1 otherwise (a child
killed, or one that failed its drain). Children also get SIGTERM if the supervisor dies
(Linux `PR_SET_PDEATHSIG`), so they are never orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("inference_worker.supervisor")

CONFIG_ERROR = 2
KILL_MARGIN_S = 10.0


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 1.0
    max_s: float = 30.0
    stable_s: float = 60.0  # a child up this long resets its backoff

    def delay(self, failures: int) -> float:
        return float(min(self.max_s, self.initial_s * 2.0 ** max(0, failures - 1)))


@dataclass(frozen=True)
class Slot:
    index: int
    name: str
    gpu: str | None
    metrics_port: int


def plan_slots(
    base_name: str, replicas: int | None, gpus: Sequence[str], metrics_port: int
) -> list[Slot]:
    """The slots to run (see the module docstring)."""
    per = 1 if replicas is None else replicas
    if per < 1:
        raise ValueError("--replicas must be at least 1")
    devices: list[str | None] = list(gpus) if gpus else [None]
    slots: list[Slot] = []
    for gpu in devices:
        for _ in range(per):
            i = len(slots)
            port = metrics_port + i if metrics_port else 0
            slots.append(Slot(i, f"{base_name}-{i}", gpu, port))
    return slots


def parse_gpus(text: str) -> list[str]:
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus:
        raise ValueError("--gpus needs a comma-separated list, e.g. 0,1")
    return gpus


@dataclass
class _Child:
    slot: Slot
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    failures: int = 0
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    def __init__(
        self,
        slots: Sequence[Slot],
        child_args: Sequence[str],
        *,
        env: Mapping[str, str],
        drain_timeout_s: float,
        backoff: Backoff = Backoff(),
        python: str = sys.executable,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._children = [_Child(s) for s in slots]
        self._args = list(child_args)
        self._env = dict(env)
        self._wait_s = drain_timeout_s + KILL_MARGIN_S
        self._backoff = backoff
        self._python = python
        self._clock = clock
        self._stopping = asyncio.Event()
        self._config_error = False

    @property
    def children(self) -> list[_Child]:
        return self._children

    def child_env(self, slot: Slot) -> dict[str, str]:
        env = dict(self._env)
        env["IW_WORKER__NAME"] = slot.name
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.gpu
        return env

    def child_argv(self, slot: Slot) -> list[str]:
        return [self._python, "-m", "inference_worker.cli", "run", *self._args,
                "--metrics-port", str(slot.metrics_port)]  # fmt: skip

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            await asyncio.gather(*(self._keep(c) for c in self._children))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if self._config_error:
            return CONFIG_ERROR
        finals = [c.exit_codes[-1] if c.exit_codes else 0 for c in self._children]
        return 0 if all(code == 0 for code in finals) else 1

    async def _spawn(self, child: _Child) -> asyncio.subprocess.Process:
        slot = child.slot
        proc = await asyncio.create_subprocess_exec(
            *self.child_argv(slot),
            env=self.child_env(slot),
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            # Own process group: a terminal's Ctrl-C reaches the supervisor only, which
            # forwards it once; children never see two signals.
            start_new_session=True,
        )
        child.proc = proc
        child.started = self._clock()
        log.info(
            "child started",
            extra={"slot": slot.index, "worker": slot.name, "pid": proc.pid, "gpu": slot.gpu,
                   "metrics_port": slot.metrics_port},
        )  # fmt: skip
        return proc

    async def _keep(self, child: _Child) -> None:
        """Run one slot until the supervisor stops, restarting crashes with backoff."""
        while not self._stopping.is_set():
            proc = await self._spawn(child)
            stopper = asyncio.create_task(self._stopping.wait())
            exited = asyncio.create_task(proc.wait())
            await asyncio.wait({stopper, exited}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not exited.done():
                code = await self._terminate(child, proc, exited)
                child.exit_codes.append(code)
                return
            code = exited.result()
            child.exit_codes.append(code)
            if self._stopping.is_set():
                return
            ran = self._clock() - child.started
            if code == CONFIG_ERROR:
                log.error(
                    "child exited with a configuration error; not restarting",
                    extra={"slot": child.slot.index, "worker": child.slot.name},
                )
                self._config_error = True
                return
            child.failures = 1 if ran >= self._backoff.stable_s else child.failures + 1
            delay = self._backoff.delay(child.failures)
            log.warning(
                "child exited; restarting",
                extra={"slot": child.slot.index, "worker": child.slot.name, "code": code,
                       "ran_s": round(ran, 3), "restart_in_s": delay},
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            child.restarts += 1

    async def _terminate(
        self, child: _Child, proc: asyncio.subprocess.Process, exited: asyncio.Task[int]
    ) -> int:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(asyncio.shield(exited), self._wait_s)
        except TimeoutError:
            log.error(
                "child did not drain in time; killing",
                extra={"slot": child.slot.index, "worker": child.slot.name},
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            code = await exited
            return code if code != 0 else 1
        log.info(
            "child stopped",
            extra={"slot": child.slot.index, "worker": child.slot.name, "code": code},
        )
        return code


def supervise(
    *,
    base_name: str,
    replicas: int | None,
    gpus: Sequence[str],
    metrics_port: int,
    drain_timeout_s: float,
    child_args: Sequence[str],
    env: Mapping[str, str],
) -> int:
    """Run the supervisor to completion (blocking); returns its exit status."""
    slots = plan_slots(base_name or socket.gethostname(), replicas, gpus, metrics_port)
    log.info("supervisor starting", extra={"slots": len(slots), "pid": os.getpid()})
    sup = Supervisor(slots, child_args, env=env, drain_timeout_s=drain_timeout_s)
    return asyncio.run(sup.run())
