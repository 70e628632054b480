"""Failure handling of a multi-process run: heartbeat watchdog, peer-failure detection, fast exit.

A peer that dies makes every collective fail ("connection closed"), which `exit_on_peer_failure`
turns into one clear line and exit status EXIT_PEER_LOST (3); a peer that hangs or a machine
that vanishes stops its heartbeat, which the `_Watchdog` thread started by `initialize` notices
within `peer_timeout` seconds (same message, same status). JAX's own heartbeat is the backstop.
`exit_now` leaves at once, without waiting in jax's shutdown barrier for peers that may be
waiting for this process in a collective.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from .launch import Launch, launch_info

EXIT_PEER_LOST = 3  # exit status of a process whose peer died or hung


def _die(msg: str) -> None:
    """One clear line on stderr, then exit at once: jax's shutdown barrier would wait for the
    dead peer (and then abort with a C++ stack trace)."""
    try:
        sys.stdout.flush()
        sys.stderr.write(f"eggroll: error: {msg}\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_PEER_LOST)


def peer_lost_message(detail: str) -> str:
    launch = launch_info()
    return (f"process {launch.process_id} of {launch.num_processes} lost a peer ({detail}). Another "
            "process died or the network failed; this process stops too. Restart every process with "
            "--resume to continue from the last checkpoint.")


class _Watchdog(threading.Thread):
    """Each process bumps its own counter in the coordinator's key-value store every `period` s
    and checks that every peer's counter moved within `timeout` s. A process that finished
    cleanly says so (key 'done') and is no longer watched."""

    def __init__(self, launch: Launch, timeout: float):
        super().__init__(name="eggroll-heartbeat", daemon=True)
        self.launch, self.timeout = launch, timeout
        self.period = max(0.2, min(2.0, timeout / 10))
        self.stopped = threading.Event()

    def run(self):
        from jax._src import distributed as jd

        client = jd.global_state.client
        me, n = self.launch.process_id, self.launch.num_processes
        seen = {q: (None, time.monotonic()) for q in range(n) if q != me}
        last_ok, beat = time.monotonic(), 0
        while not self.stopped.wait(self.period):
            now = time.monotonic()
            try:
                client.key_value_set(f"eggroll/hb/{me}", str(beat), allow_overwrite=True)
                beat += 1
                last_ok = now
            except Exception as e:  # the coordinator (process 0) is gone or unreachable
                if now - last_ok > self.timeout and not self.stopped.is_set():
                    _die(peer_lost_message(f"the coordinator {self.launch.coordinator} has not answered "
                                           f"for {self.timeout:.0f} s: {str(e).splitlines()[0][:200]}"))
                continue
            for q in list(seen):
                try:
                    if _try_get(client, f"eggroll/done/{q}") is not None:
                        del seen[q]
                        continue
                    value = _try_get(client, f"eggroll/hb/{q}")
                except Exception:
                    continue  # judged by the coordinator check above
                old, t = seen[q]
                if value != old:
                    seen[q] = (value, now)
                elif now - t > self.timeout and not self.stopped.is_set():
                    _die(peer_lost_message(f"process {q} has sent no heartbeat for {self.timeout:.0f} s"))

    def finish(self):
        """Say 'done' (peers stop watching this process) and stop."""
        self.stopped.set()
        from jax._src import distributed as jd

        with contextlib.suppress(Exception):
            jd.global_state.client.key_value_set(f"eggroll/done/{self.launch.process_id}", "1",
                                                 allow_overwrite=True)


def _try_get(client, key):
    try:
        return client.key_value_try_get(key)
    except Exception as e:
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
            return None
        raise


_PEER_ERRORS = ("gloo", "connection closed", "connection reset", "coordination", "heartbeat",
                "unavailable", "broken pipe", "socket closed")


def is_peer_failure(e: BaseException) -> bool:
    """Did this exception come from a collective / the coordinator losing a peer?"""
    text = f"{type(e).__name__}: {e}".lower()
    return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and any(s in text for s in _PEER_ERRORS)


def exit_now(code: int, message: str | None = None) -> None:
    """Flush, print `message` (one line) on stderr and leave at once with `code`. In a
    multi-process run a process must not wait in jax's shutdown barrier for peers that may be
    waiting for it in a collective."""
    sys.stdout.flush()
    if message:
        sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def exit_on_peer_failure(label: str = "eggroll"):
    """For library users: in a multi-process run, a collective that fails because a peer went
    away becomes one clear line and exit status 3; any other exception its traceback and exit
    status 1, without waiting in the shutdown barrier. With one process it does nothing."""
    try:
        yield
    except Exception as e:
        if launch_info().num_processes == 1:
            raise
        if is_peer_failure(e):
            _die(peer_lost_message(f"a collective failed: {str(e).splitlines()[0][:300]}"))
        import traceback

        traceback.print_exc()
        exit_now(1, f"{label}: error on process {launch_info().process_id}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:300] if str(e) else ''}")
