"""A process whose main thread is interrupted (KeyboardInterrupt) inside queue calls, again and
again, while other threads contend for the queue's locks (tests/test_interrupts.py).

    python tests/interrupt_child.py PATTERN [INTERRUPTS]

PATTERN "locks": the main thread enqueues, polls, takes and waits in a loop while two threads
take and give back the producer and consumer locks and a third calls ``_thread.interrupt_main()``
every 1-20 ms (a Ctrl-C whose handler runs while the main thread waits for a lock).  After each
KeyboardInterrupt both locks must be free within 2 s; then ``close()`` must return.
PATTERN "reserve": the same, but a contending thread holds reservations (reserve, commit: other
threads then wait behind bulk._HeldLock) and the main thread also calls enqueue_many and
reserve/cancel; after each interrupt no reservation may be left open either.
PATTERN "pause": ``with q.paused():`` while a slow message (0.2 s on the simulator) keeps the
lease busy, interrupted after 0-0.3 s (in the wait, as it returns, or in the block); afterwards no
pause may be left in force: a new message must be processed within 2 s.
Prints LEAKED and exits 3 if a lock stayed held (a later call or close() would wait for ever) or
a reservation open, else prints OK with the counts and exits 0.
"""

import _thread
import os
import random
import sys
import threading
import time

from gpuq_driver import GpuQueue, QueueConfig, QueueFull, ResultTimeout, UnknownMessage

PATTERN = sys.argv[1]
INTERRUPTS = int(sys.argv[2]) if len(sys.argv) > 2 else 100


def real(lock):
    return getattr(lock, "real", lock)  # bulk._HeldLock stands in for the producer lock in a reservation


def locks_free(q) -> str | None:
    """The name of a queue lock that cannot be taken within 2 s (or of a reservation left open), or None."""
    if q._reserved or q._reservation is not None or type(q._plock) is not type(q._clock):
        return f"reservation (reserved {q._reserved}, {q._reservation}, {q._plock})"
    for name in ("_plock", "_clock"):
        lock = real(getattr(q, name))
        if not lock.acquire(timeout=2.0):
            return name
        lock.release()
    return None


def pauses(rounds: int) -> int:
    q = GpuQueue(QueueConfig(capacity=64, slot_bytes=64, backend="sim"))
    rng = random.Random(os.getpid())
    hits = 0
    for i in range(rounds):
        q._kernel.delay_s = 0.2
        q.enqueue(b"slow")
        time.sleep(0.02)
        timer = threading.Timer(rng.uniform(0.0, 0.3), _thread.interrupt_main)
        timer.start()
        try:
            with q.paused():
                time.sleep(0.3)
        except KeyboardInterrupt:
            hits += 1
        timer.join()
        q._kernel.delay_s = 0.0
        try:
            for mid in q.outstanding():
                q.wait_result(mid, timeout=2.0)
        except ResultTimeout as exc:
            print(f"LEAKED pause after round {i}: {exc}; kernel {q.stats().kernel}")
            sys.stdout.flush()
            os._exit(3)
    q.close()
    print(f"OK {rounds} rounds, {hits} interrupted")
    return 0


def main() -> int:
    if PATTERN == "pause":
        return pauses(INTERRUPTS)
    q = GpuQueue(QueueConfig(capacity=64, slot_bytes=64, backend="sim"))
    stop, fire, quiet = threading.Event(), threading.Event(), threading.Event()
    rng = random.Random(os.getpid())

    def contend():  # another producer and another consumer, as far as the locks go
        while not stop.is_set():
            if quiet.is_set():
                time.sleep(1e-3)
                continue
            with q._clock:
                time.sleep(0)
            if PATTERN == "reserve":
                for mid in q.poll_completions():
                    q.try_dequeue_result(mid)
                try:
                    with q.reserve(4, timeout=0.1) as r:
                        r.lengths[:] = 3
                        time.sleep(0)
                except QueueFull:
                    pass
            else:
                with real(q._plock):
                    time.sleep(0)

    def interrupter():
        while not stop.is_set():
            time.sleep(rng.uniform(0.001, 0.02))
            if fire.is_set():
                _thread.interrupt_main()

    threads = [threading.Thread(target=f, daemon=True) for f in (contend, contend, interrupter)]
    for t in threads:
        t.start()
    hits = 0
    while hits < INTERRUPTS:
        quiet.clear()
        fire.set()
        try:
            while True:
                try:
                    q.enqueue(b"x" * 10, timeout=0.5)
                    if PATTERN == "reserve":
                        q.enqueue_many([b"ab", b"cd"], timeout=0.5)
                        q.reserve(2, timeout=0.5).cancel()
                except QueueFull:
                    pass
                for mid in q.poll_completions():
                    q.try_dequeue_result(mid)
                for mid in q.outstanding()[:1]:
                    try:
                        q.wait_result(mid, timeout=0.01)
                    except (ResultTimeout, UnknownMessage):  # another consumer took it
                        pass
        except KeyboardInterrupt as exc:
            hits += 1
            where = exc.__traceback__
            while where.tb_next is not None:
                where = where.tb_next
            fire.clear()
        quiet.set()
        time.sleep(0.05)  # an interrupt already on its way lands here, outside the queue
        leaked = locks_free(q)
        if leaked:
            print(
                f"LEAKED {leaked} after interrupt {hits}, "
                f"raised at {where.tb_frame.f_code.co_name} line {where.tb_lineno}"
            )
            sys.stdout.flush()
            os._exit(3)
    stop.set()
    for t in threads:
        t.join()
    q.close()
    print(f"OK {hits} interrupts, {q.closed=}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
