"""Stateful property test of the kernel's bids (device_src/gpuq_queue.cu: bid(), wait_for,
process_one, scout_loop; docs/design.md, "Scouts"), on a model of the warps, not on a GPU.

Worker warps claim msg_ids in order; the one whose claim is the head is the front: it announces
its message, polls (the doorbell, its slot and the bids word), and serves what it finds; scout
warps poll the announced slot (after a wait for their phase) and bid for it; leases end (the
front that sees the time up makes the last doorbell read and publishes the final head), and the
last warp out resets the claims and the bids to the head.  Hypothesis interleaves every warp's
steps with the host's (write a slot, short or long, ring the doorbell), tears reads (bytes or
header) at will, and ends leases at any time.  A front's poll reads the bids,
the leaving flag and the clock first, the doorbell and its slot a step later (at the host, a PCIe
round trip after), and acts on them a step after that, so stale fronts (a scout took their
message while their poll was in flight, and their doorbell read may come after another front's
last read of the lease) are part of the search.  Checked after every step:
no message is served twice, none before the host wrote it, and at every lease end exactly the
messages below the head were served; and at the end, every message rung is served.  The model is
sequentially consistent: it checks the
protocol's logic; the memory ordering that makes its steps atomic is argued in design.md.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

WORKERS, SCOUTS = 3, 2
LOST = "lost"


class Warp:
    def __init__(self, scout: bool):
        self.scout = scout
        self.reset()

    def reset(self):
        self.state = "look" if self.scout else "claim"
        self.s = None  # the msg_id this warp waits for or serves
        self.own = False  # won its bid for s, read of s did not hold: waits for s again, no bid
        self.need_bid = False
        self.gold = 0  # what its bid returned (0: no bid)
        self.snap = None  # a poll's values, read at issue, acted on at its decision


class BidsModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.written = 0  # slots 0 .. written - 1 hold their messages (header last)
        self.long: set[int] = set()  # messages over 64 bytes (or unchecked): never served from a read
        self.doorbell = 0  # the host rings after writing
        self.head = self.claim = self.grab = self.front = 0
        self.stop = "run"
        self.leaving = False
        self.over = False  # the lease's time is up
        self.served: Counter = Counter()
        self.warps = [Warp(False) for _ in range(WORKERS)] + [Warp(True) for _ in range(SCOUTS)]
        self.leases = 0

    # -- the host ---------------------------------------------------------------------------
    @precondition(lambda self: self.written < 12)
    @rule(long=st.booleans())
    def host_writes_a_slot(self, long=False):
        if long:
            self.long.add(self.written)
        self.written += 1

    @precondition(lambda self: self.doorbell < self.written)
    @rule()
    def host_rings(self):
        self.doorbell += 1

    @rule()
    def lease_time_is_up(self):
        self.over = True

    # -- device helpers ---------------------------------------------------------------------
    def bid(self, s: int) -> int:
        old = self.grab
        self.grab = max(self.grab, s + 1)
        return old

    def serve(self, s: int, publish: int):
        assert s < self.written, f"msg {s} served before the host wrote it"
        self.served[s] += 1
        assert self.served[s] == 1, f"msg {s} served twice"
        self.head = max(self.head, publish)

    def read_slot(self, s: int, torn: int) -> tuple[bool, bool]:
        """A read of slot s: (holds, candidate).  A candidate's header is s's, checked and at most
        64 bytes long (slot_candidate); it holds if its bytes are not torn either (read_holds).
        torn: 0 none, 1 the bytes, 2 the header (stale or torn: not a candidate)."""
        candidate = s < self.written and s not in self.long and torn != 2
        return candidate and torn == 0, candidate

    def exited(self) -> bool:
        return all(w.state == "exit" for w in self.warps)

    # -- one step of warp i ------------------------------------------------------------------
    @rule(i=st.integers(0, WORKERS + SCOUTS - 1), torn=st.integers(0, 2))
    def step(self, i, torn):
        w = self.warps[i]
        if w.state == "exit":
            return
        if w.scout:
            self.scout_step(w, torn)
        else:
            self.worker_step(w, torn)

    def scout_step(self, w: Warp, torn: int):
        if w.state == "look":
            if self.stop != "run":
                w.state = "exit"
            elif self.front > self.grab:  # announced and not taken
                w.s = self.front - 1
                w.state = "scout_read"  # it waits for its phase: the lease may end meanwhile
        elif w.state == "scout_read":  # the slot's read (no stop check after the look, as in scout_loop)
            w.snap = self.read_slot(w.s, torn)
            w.state = "scout_polled"
        elif w.state == "scout_polled":
            holds, candidate = w.snap
            w.state = "look"
            if not candidate:
                return
            if self.bid(w.s) > w.s:
                return  # the front (or another scout) has it
            if holds:
                self.serve(w.s, w.s + 1)
            else:  # owns s: waits for it as its front (wait_for with own)
                w.own, w.state = True, "wait"
        else:
            self.worker_step(w, torn)

    def worker_step(self, w: Warp, torn: int):
        if w.state == "claim":
            w.s, w.own = self.claim, False
            self.claim += 1
            w.state = "wait"
        elif w.state == "wait":
            if w.s < self.head:
                self.finish(w, self.serve_slot(w, 0))
            elif self.stop != "run":
                w.state = "exit"
            elif w.s == self.head:  # the front
                self.front = w.s + 1
                w.need_bid, w.gold = not w.own, 0
                w.state = "poll"
        elif w.state == "poll":  # issue: the VRAM words and the clock, read before the round trip
            w.snap = (self.grab if w.need_bid else 0, self.leaving, self.over)
            w.state = "in_flight"
        elif w.state == "in_flight":  # the doorbell and the slot, read at the host later (PCIe)
            w.snap += (self.doorbell, *self.read_slot(w.s, torn))
            w.state = "decide"
        elif w.state == "decide":
            self.decide(w)
        elif w.state == "wait_stop":  # another front is leaving: wait for its final head
            if self.stop != "run":
                ret = w.s if w.s < self.head else None
                if w.need_bid:
                    w.gold, w.need_bid = self.bid(w.s), False
                self.after_wait(w, ret)
        elif w.state == "last_read":  # the lease's last doorbell read, then its decision
            hh = self.doorbell
            if w.need_bid:
                w.gold, w.need_bid = self.bid(w.s), False
            if w.gold > w.s:
                self.after_wait(w, LOST)
                return
            self.head = max(self.head, hh)
            self.stop = "leave"
            self.after_wait(w, w.s if w.s < hh else None)

    def decide(self, w: Warp):
        g, lv, over, db, holds, candidate = w.snap
        if g > w.s:
            self.after_wait(w, LOST)
            return
        if over or lv:
            if w.need_bid:
                w.gold, w.need_bid = self.bid(w.s), False
            if w.gold > w.s:
                self.after_wait(w, LOST)
            elif self.leaving:
                w.state = "wait_stop"
            else:
                self.leaving = True
                w.state = "last_read"
            return
        if w.s < db or candidate:
            if w.need_bid:
                w.gold, w.need_bid = self.bid(w.s), False
            won = w.gold <= w.s
            if candidate:
                if not won:
                    self.finish(w, False)
                elif holds:
                    self.serve(w.s, max(db, w.s + 1))
                    self.finish(w, True)
                elif db <= w.s:
                    w.own, w.state = True, "wait"  # kRetry
                else:
                    self.finish(w, self.serve_slot(w, db))
            else:
                self.finish(w, self.serve_slot(w, db) if won else False)
        else:
            w.state = "poll"

    def serve_slot(self, w: Warp, publish: int) -> bool:
        """The two-read path: the doorbell (or the head) has shown s, so its slot is read after it."""
        self.serve(w.s, max(publish, self.head))
        return True

    def after_wait(self, w: Warp, ret):
        if ret is None:
            w.state = "exit"
        elif ret == LOST:
            self.finish(w, False)
        elif w.gold > w.s:
            self.finish(w, False)  # kGone
        else:
            self.finish(w, self.serve_slot(w, 0))

    def finish(self, w: Warp, served: bool):
        w.own, w.need_bid, w.gold = False, False, 0
        w.state = "look" if w.scout else "claim"

    # -- the lease's end ---------------------------------------------------------------------
    @precondition(lambda self: self.exited())
    @rule()
    def last_warp_out_ends_the_lease(self):
        below = {m for m in range(self.head)}
        assert set(self.served) == below, f"lease end: served {sorted(self.served)}, head {self.head}"
        self.claim = self.grab = self.head
        self.front, self.stop, self.leaving, self.over = 0, "run", False, False
        self.leases += 1
        for w in self.warps:
            w.reset()

    def teardown(self):
        """Progress: once the host has rung every message, the warps taking turns (no more torn
        reads; leases ending and starting again if their time was up) serve them all."""
        self.doorbell = self.written
        for _ in range(2000):
            if len(self.served) == self.written and self.head == self.written:
                return
            if self.exited():
                self.last_warp_out_ends_the_lease()
            for w in self.warps:
                self.step(self.warps.index(w), 0)
        raise AssertionError(f"stuck: {self.written} written, served {sorted(self.served)}, head {self.head}")

    @invariant()
    def nothing_at_or_above_the_head_is_served_at_a_lease_end(self):
        if self.exited():
            assert all(m < self.head for m in self.served)


TestBids = BidsModel.TestCase
TestBids.settings = settings(max_examples=300, stateful_step_count=120, deadline=None)


@pytest.mark.parametrize("stale_read", [0, 2])  # its slot read: a candidate, or a torn header (two reads)
def test_a_front_that_lost_publishes_nothing(stale_read):
    """The rule Hypothesis rarely reaches by itself: a stale front (a scout took its message while
    its poll was in flight) whose doorbell read returns after another front's last read of the
    lease must not publish that doorbell's head (gpuq_queue.cu, serve_slot / process_one: kGone
    before any publish).  Were it to, the head would pass the lease's final head, and messages
    whose warps had already left on the stop would be below the head yet never served."""
    m = BidsModel()
    front, nxt, third, scout = 0, 1, 2, WORKERS

    def steps(i, k=1, torn=0):
        for _ in range(k):
            m.step(i, torn)

    m.host_writes_a_slot()  # message 0, not rung yet
    for i in (front, nxt, third):
        steps(i)  # claims 0, 1, 2
    steps(front, 2)  # front for 0; its poll issues (bids 0, the lease's time not up)
    steps(scout, 3)  # look, read slot 0 (it holds), bid: the scout serves 0, head 1
    assert m.served[0] == 1 and m.head == 1
    steps(nxt)  # front for 1
    m.lease_time_is_up()
    steps(nxt, 4)  # poll, doorbell 0, bids and wins 1, leads the lease's end: final head 1
    assert m.stop == "leave" and m.head == 1
    steps(third)  # message 2's warp leaves on the stop
    m.host_writes_a_slot()
    m.host_writes_a_slot()
    for _ in range(3):
        m.host_rings()  # after the lease's last read
    steps(front, 2, stale_read)  # the stale front's doorbell read returns 3; it bids, loses: publishes nothing
    assert m.head == 1
    for i in range(len(m.warps)):
        steps(i, 2)
    assert m.exited()
    m.last_warp_out_ends_the_lease()  # exactly message 0 served, below the head 1
    m.teardown()  # the next lease serves 1 and 2
