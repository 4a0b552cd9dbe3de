"""A process that leaves a queue open and a daemon thread using it, then exits (tests/test_exit.py).

    python tests/exit_child.py BACKEND PATTERN

PATTERN: "poller" (a thread polls and takes results forever), "blocked" (a producer blocked on a
full ring with no timeout), "pipeline" (a producer thread and a consumer thread in a loop).
An atexit hook registered before gpuq_driver is imported runs after the library's exit cleanup
and checks that every call then raises QueueClosed; it prints CLOSED-OK.  The parent checks the
exit status (0) and that line.
"""

import atexit
import math
import os
import sys
import threading
import time

BACKEND, PATTERN = sys.argv[1], sys.argv[2]
state = {}


def check_closed():  # registered first, so it runs after gpuq_driver's own exit hook
    from gpuq_driver import QueueClosed

    q = state["q"]
    calls = {
        "enqueue": lambda: q.enqueue(b"x", timeout=0),
        "poll_completions": q.poll_completions,
        "try_dequeue_result": lambda: q.try_dequeue_result(0),
        "wait_result": lambda: q.wait_result(0),
        "stats": q.stats,
        "shutdown": q.shutdown,
        "pause": q.pause,
        "resume": q.resume,
    }
    wrong = []
    for name, call in calls.items():
        try:
            call()
            wrong.append(f"{name} returned")
        except QueueClosed:
            pass
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            wrong.append(f"{name} raised {type(exc).__name__}: {exc}")
    print("CLOSED-OK" if not wrong and q.closed else f"CLOSED-WRONG {wrong} closed={q.closed}", flush=True)


atexit.register(check_closed)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpuq_driver import GpuQueue, QueueConfig  # noqa: E402

capacity = 4 if PATTERN == "blocked" else 256
q = state["q"] = GpuQueue(QueueConfig(capacity=capacity, slot_bytes=64, backend=BACKEND, enqueue_timeout_s=math.inf))


def forever(fn):
    def run():
        try:
            while True:
                fn()
        except Exception:  # QueueClosed once the exit cleanup ran: the thread ends quietly
            pass

    return threading.Thread(target=run, daemon=True)


def take_all():
    for mid in q.poll_completions():
        q.try_dequeue_result(mid)


if PATTERN == "poller":
    for i in range(100):
        q.enqueue(bytes([i % 256]) * 64)
    threads = [forever(take_all)]
elif PATTERN == "blocked":
    threads = [forever(lambda: q.enqueue(b"b" * 64))]  # 4 go in, the 5th blocks forever
elif PATTERN == "pipeline":
    threads = [forever(lambda: q.enqueue(os.urandom(64))), forever(take_all)]
else:
    sys.exit(f"unknown pattern {PATTERN}")
for t in threads:
    t.start()
time.sleep(0.2)
print(f"EXITING {q.stats()}", flush=True)
# no close(): the interpreter exits with the threads still inside the queue
