"""Helpers shared by the Redis Streams tests (test_stream_*.py, test_redis_clients.py): payloads,
the results expected of them, and checks that each was published exactly once.
"""

from __future__ import annotations

import random

from gpuq_driver.streams import read_results


def make_payloads(n: int, seed: int = 0, max_len: int = 200) -> list[bytes]:
    """n distinct payloads of random length (every 997th one empty)."""
    rng = random.Random(seed)
    return [b"" if i % 997 == 0 else b"%06d:" % i + rng.randbytes(rng.randint(0, max_len)) for i in range(n)]


def expected_results(ids: list[bytes], payloads: list, frame: int) -> dict:
    """{(entry id, index): payload} for payloads sent with StreamProducer(frame=frame)."""
    assert len(ids) == -(-len(payloads) // frame)
    return {
        (eid, i): payloads[j * frame + i]
        for j, eid in enumerate(ids)
        for i in range(min(frame, len(payloads) - j * frame))
    }


def all_results(client, result_stream: str) -> list:
    """Every (msg_id, result) in ``result_stream``, read with read_results until it is exhausted."""
    after, out = "0", []
    while True:
        last, got = read_results(client, result_stream, after, count=300)
        out += got
        if last == after:
            return out
        after = last


def assert_exactly_once(results: list, expected: dict) -> None:
    ids = [mid for mid, _ in results]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} results published twice"
    assert set(ids) == set(expected), (
        f"missing {len(set(expected) - set(ids))}, unexpected {len(set(ids) - set(expected))}"
    )
    wrong = [mid for mid, r in results if r != expected[mid]]
    assert wrong == [], f"{len(wrong)} wrong results, first {wrong[:3]}"


def pel_ids(client, stream: str = "s", group: str = "g") -> list[bytes]:
    return [p["message_id"] for p in client.xpending_range(stream, group, "-", "+", 100_000)]
