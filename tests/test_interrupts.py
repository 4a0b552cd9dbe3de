"""Ctrl-C (KeyboardInterrupt) landing inside queue calls: the queue must stay usable or close
cleanly, with no lock left held and nothing left paused.  Signal tests run in child processes with
a time bound (tests/interrupt_child.py), so a deadlock fails instead of stalling the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHILD = Path(__file__).with_name("interrupt_child.py")


def run_child(*args: str, timeout: float = 120) -> tuple[int | str, str]:
    try:
        r = subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return f"hang (> {timeout} s)", str(exc.stdout) + str(exc.stderr)
    return r.returncode, r.stdout + r.stderr


def test_an_interrupt_while_waiting_for_a_lock_leaves_no_lock_held():
    """enqueue, poll_completions, try_dequeue_result and wait_result took their lock with
    ``acquire(); try:``: a KeyboardInterrupt raised as acquire() returned (CPython runs signal
    handlers after each call) skipped the ``finally`` and left the lock held, so the next call, or
    close() (also a ``with GpuQueue(...)`` block's exit), waited for ever.  Failed within the first
    1-8 of 100 interrupts before the fix."""
    code, out = run_child("locks", "100")
    assert code == 0 and "OK 100 interrupts" in out, out[-2000:]


def test_an_interrupt_beside_a_reservation_leaves_no_lock_held_and_no_reservation_open():
    """The same beside reservations: reserve() took the producer lock with ``acquire(); try:``,
    and other threads took it through bulk._HeldLock's Python-level acquire while another thread's
    reservation held it, so an interrupt could leave it held (and a Reservation dropped after the
    lock was given back would have released it again).  Failed within 2-12 of 150 interrupts
    before the fix."""
    code, out = run_child("reserve", "150")
    assert code == 0 and "OK 150 interrupts" in out, out[-2000:]


def test_an_interrupted_pause_leaves_nothing_paused():
    """``with q.paused():`` interrupted while pause() waited for the lease to leave left the pause
    in force (Leases.pause undid itself only on its own timeout), so every later message waited
    for a resume() nobody would call: wait_result raised ResultTimeout "the queue is paused"."""
    code, out = run_child("pause", "12")
    assert code == 0 and "OK 12 rounds" in out, out[-2000:]
