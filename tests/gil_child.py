"""A consumer thread that spins on a non-blocking call while the interpreter never takes the GIL
from a running thread (``sys.setswitchinterval(1000)``), so any thread that lets go of the GIL (the
simulator's kernel thread when it sleeps; on the GPU a producer's launch) gets it back only when
the spinner gives way (tests/test_queue.py).

    python tests/gil_child.py BACKEND CALL [COUNT] [CAPACITY]

CALL "poll": the consumer loops on ``poll_completions`` and takes what it reports; "take": it spins
on ``try_dequeue_result(msg_id)`` for each msg_id in turn (the module docstring's loop); "stats":
it spins on ``stats().processed`` until it passes each msg_id, then takes it.  The main
thread enqueues COUNT messages (4 bytes each, distinct) into a ring of CAPACITY slots (4096; a
smaller ring makes the producer wait for free slots), then joins the consumer.  Prints OK and
exits 0 once every result came back right; a consumer that never lets go hangs (the parent's time
bound fails it).
"""

import sys
import threading

from gpuq_driver import GpuQueue, QueueConfig

BACKEND, CALL = sys.argv[1], sys.argv[2]
COUNT = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
CAPACITY = int(sys.argv[4]) if len(sys.argv) > 4 else 4096


def main() -> int:
    got: dict[int, bytes] = {}
    leases = {"lease_ms": 0.2} if BACKEND == "cuda" else {}  # many leases: a launch each
    with GpuQueue(QueueConfig(backend=BACKEND, capacity=CAPACITY, slot_bytes=16, **leases)) as q:

        def consumer() -> None:
            if CALL == "poll":
                while len(got) < COUNT:
                    for mid in q.poll_completions():
                        got[mid] = q.try_dequeue_result(mid)
            else:
                for mid in range(COUNT):
                    if CALL == "stats":  # a loop waiting on a counter, then the take
                        while q.stats().processed <= mid:
                            pass
                    while (r := q.try_dequeue_result(mid)) is None:
                        pass
                    got[mid] = r

        sys.setswitchinterval(1000.0)  # a spinning thread keeps the GIL until it lets go itself
        c = threading.Thread(target=consumer, daemon=True)
        c.start()
        for i in range(COUNT):
            q.enqueue(i.to_bytes(4, "little"), timeout=60)
        c.join()
        sys.setswitchinterval(0.005)
    wrong = sum(got.get(i) != i.to_bytes(4, "little") for i in range(COUNT))
    print(f"{'OK' if wrong == 0 else 'WRONG'} {len(got)} results, {wrong} wrong")
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
