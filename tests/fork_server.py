"""Child processes forked from one multiprocessing fork server that has imported torch, so a
test that starts many processes pays milliseconds a start instead of an import of torch each
(~3-4 s of CPU on a 2-core CI host). A child is still a separate process: SIGKILL is real.

    context()                  the fork server's multiprocessing context, for Process and Pipe
    receive(conn, child)       the next message a child sent, failing the test if it hangs
    drain(conn)                every message a killed child sent before it died
    save_forever(conn, ckpt, empty_state, make_state)
                               the saver the SIGKILL tests kill (run in the child)

The fork server is one per test process, and the first context() starts it, so its preload
list is the union of what every test's children need: a module missing here is simply
imported by each child (and one not installed is skipped by the fork server).
"""

from __future__ import annotations

import contextlib
import multiprocessing
from typing import Any, Callable

import pytest

# Only installed modules can be preloaded: the fork server does not get the test's sys.path
# (a child gets it, with its target's module, in its preparation data).
PRELOAD = ["torch", "numpy", "pyengine", "boto3", "botocore.session", "s3transfer.manager"]


def context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def receive(conn: Any, child: Any, timeout: float = 60.0) -> tuple:
    # Guards against a hung child only; no assertion depends on how long anything takes.
    if not conn.poll(timeout):
        pytest.fail(f"the child said nothing for {timeout} s (alive: {child.is_alive()}, exit code {child.exitcode})")
    return conn.recv()


def drain(conn: Any) -> list[tuple]:
    """Everything the killed child sent before it died."""
    said = []
    with contextlib.suppress(EOFError, OSError):
        while True:
            said.append(conn.recv())
    conn.close()
    return said


def save_forever(conn: Any, ckpt: Any, empty_state: Callable[[], dict], make_state: Callable[[int], dict]) -> None:
    """Restores what `ckpt` holds and saves steps after it forever, one save in flight: once
    save(N) returns, N-1 is durable. Sends ("ready", 0) first (the Checkpointer is open),
    then ("restored", step) and ("durable", N-1) after each save."""
    conn.send(("ready", 0))
    state = empty_state()
    step = ckpt.restore(state) or 0
    conn.send(("restored", step))
    while True:
        step += 1
        ckpt.save(step, make_state(step))
        conn.send(("durable", step - 1))
