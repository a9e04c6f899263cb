"""The scheduler of `chatsmith serve`: one thread owns the engine (the model is not re-entrant) and
steps the whole batch. Every active request advances one token per forward pass, new requests join
between steps and finished ones leave (continuous batching, `chatsmith.engine`).

Handlers talk to it through queues: a request goes in through the scheduler's inbox, its tokens
come back on its own asyncio queue. Beyond `max_queue` waiting requests `admit` answers 429. A
caller that leaves early (a client that disconnects) cancels its generation, which frees its batch
rows at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Awaitable, Callable

from chatsmith import runtime
from chatsmith.engine import Engine, SamplingParams
from chatsmith.errors import UserError
from chatsmith.serve.protocol import APIError


class Ticket:
    """One engine request as the event loop sees it: its queue of ('events', [...]) / ('done',
    completions) / ('error', APIError) messages."""

    __slots__ = ("prompt_ids", "params", "stream_id", "queue", "req")

    def __init__(self, prompt_ids, params, stream_id):
        self.prompt_ids, self.params, self.stream_id = prompt_ids, params, stream_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.req = None


class Scheduler:
    """The thread that steps the engine. `steps` counts forward passes, `cancelled` the requests
    cancelled before they finished, `samples_stopped` the single samples ended early (read by tests)."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.engine, self.loop = engine, loop
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.stopping = False
        self.steps = 0
        self.cancelled = 0
        self.samples_stopped = 0
        self.tickets: dict[int, Ticket] = {}  # id(engine request) -> ticket; the thread's own
        self.thread = threading.Thread(target=self._run, name="chatsmith-scheduler", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def waiting(self) -> int:
        """Requests not yet decoding (an estimate read from another thread; both sides are atomic)."""
        return self.inbox.qsize() + len(self.engine.waiting)

    def submit(self, t: Ticket):
        self.inbox.put(("add", t))

    def cancel(self, t: Ticket):
        self.inbox.put(("cancel", t))

    def stop_sample(self, t: Ticket, index: int, reason: str):
        """End one sample (choice) of a ticket's request; its other samples go on."""
        self.inbox.put(("stop_sample", (t, index, reason)))

    def stop(self):
        self.stopping = True
        self.inbox.put(("stop", None))

    # --- the thread ----------------------------------------------------------------------------
    def _run(self):
        try:
            while True:
                out = []
                if not self._apply(self._take(), out):
                    return
                if self.engine.has_work():
                    self._step(out)
                    if not self.engine.has_work():  # gone idle: the KV cache was freed; give it back
                        runtime.return_freed_memory()
                if out:
                    self.loop.call_soon_threadsafe(_deliver, out)
        except BaseException as e:  # a bug: fail every open request instead of hanging them
            self.error = e
            self._fail_all(APIError(500, f"the generation engine failed: {type(e).__name__}: {e}", "server_error"))
            raise

    def _take(self) -> list:
        """The inbox's messages: block only when there is nothing to decode, otherwise take what
        arrived and go on stepping."""
        msgs = [self.inbox.get()] if not self.engine.has_work() else []
        while True:
            try:
                msgs.append(self.inbox.get_nowait())
            except queue.Empty:
                return msgs

    def _apply(self, msgs: list, out: list) -> bool:
        """Add and cancel requests; False on 'stop'."""
        for kind, t in msgs:
            if kind == "stop":
                return False
            if kind == "add":
                try:
                    t.req = self.engine.add_request(t.prompt_ids, t.params, stream_id=t.stream_id)
                    self.tickets[id(t.req)] = t
                except UserError as e:
                    out.append((t, "error", APIError(400, str(e))))
            elif kind == "cancel" and t.req is not None and not t.req.finished:
                self.engine.cancel(t.req)
                self.tickets.pop(id(t.req), None)
                self.cancelled += 1
            elif kind == "stop_sample":
                t, index, reason = t
                if t.req is not None and not t.req.finished:
                    self.engine.stop_seq(t.req, index, reason)
                    self.samples_stopped += 1
                    if t.req.finished:  # that was its last sample still decoding: no step will say so
                        out.append((t, "done", t.req.completions))
                        self.tickets.pop(id(t.req), None)
        return True

    def _step(self, out: list):
        """One forward pass; each request's events (and its completions once finished) to its ticket."""
        events = self.engine.step()
        self.steps += 1
        by_req: dict[int, list] = {}
        for ev in events:
            by_req.setdefault(id(ev.req), []).append(ev)
        for rid, evs in by_req.items():
            t = self.tickets.get(rid)
            if t is None:
                continue
            out.append((t, "events", evs))
            if t.req.finished:
                out.append((t, "done", t.req.completions))
                del self.tickets[rid]

    def _fail_all(self, err: APIError):
        pending = list(self.tickets.values())
        try:
            while True:
                kind, t = self.inbox.get_nowait()
                if kind == "add":
                    pending.append(t)
        except queue.Empty:
            pass
        self.loop.call_soon_threadsafe(_deliver, [(t, "error", err) for t in pending])


def _deliver(out):
    for t, kind, item in out:
        t.queue.put_nowait((kind, item))


class _Tagged:
    """Routes a ticket's messages into the call's merged queue, tagged with the job index."""

    __slots__ = ("q", "i")

    def __init__(self, q, i):
        self.q, self.i = q, i

    def put_nowait(self, item):
        self.q.put_nowait((self.i, item))


def admit(sched: Scheduler | None, jobs: int, max_queue: int):
    """Refuse new work before a response starts: 503 without a running engine, 429 when full."""
    if sched is None or not sched.alive:
        raise APIError(503, "the generation engine is not running"
                       + (f" ({sched.error})" if sched and sched.error else ""),
                       type_="server_error", code="engine_unavailable")
    if sched.waiting() + jobs > max_queue:
        raise APIError(429, f"the server is busy: {sched.waiting()} requests are waiting; retry later",
                       type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})


class Samples:
    """Handed to run_jobs: lets its caller end one sample of one job early (`stop`), e.g. a choice
    the content filter cut, so that sample's batch row is freed while the others decode on."""

    def __init__(self):
        self.sched: Scheduler | None = None
        self.tickets: list[Ticket] = []

    def stop(self, job: int, index: int, reason: str = "content_filter"):
        if self.sched is not None:
            self.sched.stop_sample(self.tickets[job], index, reason)


async def run_jobs(sched: Scheduler, jobs: list[tuple[list[int], SamplingParams]],
                   disconnected: Callable[[], Awaitable[bool]] | None = None, samples: Samples | None = None):
    """Run several engine requests (the prompts of one API call) together. Async iterator of
    (job index, kind, item): kind 'events' (a list of engine Events) or 'done' (Completions).
    Leaving early (client gone, error) cancels whatever is still running. `disconnected` is asked
    about once a second: a non-streaming client that hung up is only noticed by asking."""
    tickets = [Ticket(ids, p, i) for i, (ids, p) in enumerate(jobs)]
    if samples is not None:
        samples.sched, samples.tickets = sched, tickets
    merged: asyncio.Queue = asyncio.Queue()
    for i, t in enumerate(tickets):
        t.queue = _Tagged(merged, i)
        sched.submit(t)
    left = len(tickets)
    asked = time.monotonic()
    try:
        while left:
            try:
                i, (kind, item) = await asyncio.wait_for(merged.get(), timeout=1.0)
            except asyncio.TimeoutError:
                kind = None
            # ask once a second whether the client is still there, news or not: a long reply
            # produces tokens all the time, and a client that left must not keep its rows
            if disconnected is not None and time.monotonic() - asked >= 1.0:
                asked = time.monotonic()
                if await disconnected():
                    return
            if kind is None:
                if not sched.alive:
                    raise APIError(503, "the generation engine stopped", "server_error",
                                   code="engine_unavailable") from None
                continue
            if kind == "error":
                raise item
            if kind == "done":
                left -= 1
            yield i, kind, item
    finally:
        for t in tickets:
            if t.req is None or not t.req.finished:
                sched.cancel(t)
