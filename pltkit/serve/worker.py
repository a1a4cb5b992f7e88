"""One decode worker: a thread that runs completion jobs from a queue, one at a time (the CPU
is the bottleneck, and the engine's slots are not shared across threads).

An editor's completion supersedes the stale completion of the same client (`stale`): the older
job is cancelled and ends within one prefill chunk or decode step. Nothing else cancels a job
but its own client's disconnect: a warm-up, another editor's request or a chat waits its turn.
A full queue refuses new jobs instead of growing without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

from pltkit.runtime.completion import CompletionRequest, Prompt
from pltkit.runtime.engine import Cancel, Engine, Result

log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue is full."""


@dataclass(eq=False)
class Job:
    req: CompletionRequest
    slot: Hashable
    prompt: Prompt  # laid out and checked by Engine.prompt before queueing
    on_text: Callable[[str, Result], None] | None = None  # called on the worker thread
    editor: bool = False  # a completion route's request: may supersede, or be superseded by, a stale one
    cancel: Cancel = field(default_factory=Cancel)
    superseded: bool = False
    done: Future = field(default_factory=Future)  # -> list[Result]


def stale(old: Job, new: Job) -> bool:
    """Whether `new` makes `old` worthless: both are editors' completions on the same slot, `new`
    generates (a warm-up, n_predict 0, never supersedes), and `new` is the same text a keystroke
    later: its prompt differs from the old one's but shares at least half of it from the start.
    Slots are shared (llama.vim and llama.vscode both send id_slot 0; clients without one are
    told apart only by address and user agent), so the text decides: another editor's file, or
    the same prompt sent again, supersedes nothing."""
    if not (old.editor and new.editor and old.slot == new.slot and new.req.n_predict != 0):
        return False
    a, b = old.prompt.ids, new.prompt.ids
    if a == b:
        return False
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return 2 * common >= len(a)


class Worker:
    def __init__(self, engine: Engine, max_queue: int = 16, on_finish: Callable[[Job, float, list[Result] | Exception], None] | None = None):
        self.engine, self.max_queue, self.on_finish = engine, max_queue, on_finish
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when a job starts or ends
        self._pending: list[Job] = []  # queued or running, oldest first
        self.running: Job | None = None
        self.idle = threading.Event()  # set once every job is answered and accounted for
        self.idle.set()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pltkit-decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise Busy("the server is shutting down")
            for old in self._pending:
                if not old.cancel.cancelled and stale(old, job):
                    old.superseded = True
                    old.cancel.cancel()
            waiting = sum(1 for j in self._pending if j is not self.running and not j.cancel.cancelled)
            if waiting >= self.max_queue:
                raise Busy(f"{waiting} requests are waiting; try again later")
            self._pending.append(job)
            self.idle.clear()
        self._queue.put(job)
        return job

    def wait_for(self, predicate: Callable[[Worker], bool], timeout: float | None = None) -> bool:
        """Block until predicate(self) holds, re-checked whenever a job starts or ends."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    @property
    def alive(self) -> bool:
        """Whether the worker's thread still runs jobs."""
        return self._thread.is_alive()

    @property
    def queued(self) -> int:
        with self._lock:
            return sum(1 for j in self._pending if j is not self.running)

    def close(self) -> None:
        """Cancels every job (each is answered with what it has) and stops the thread."""
        with self._lock:
            self._closed = True
            for job in self._pending:
                job.cancel.cancel()
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._changed:
                self.running = job
                self._changed.notify_all()
            start = time.perf_counter()
            try:
                if job.cancel.cancelled:  # superseded or abandoned while waiting
                    outcome = [Result("", [], "cancelled")]
                else:
                    p = job.prompt
                    outcome = self.engine.run_all(p.ids, job.req, job.slot, job.cancel, job.on_text, p.truncated,
                                                  marks=p.marks)
            except Exception as e:  # reported to the request as a 500; the worker goes on
                log.exception("generation failed")
                outcome = e
            # Accounting first, then the slot is freed and `idle` set, then the answer: whoever sees
            # the answer or an idle worker also sees this job's metrics.
            if self.on_finish is not None:
                try:
                    self.on_finish(job, start, outcome)
                except Exception:
                    log.exception("accounting for a finished job failed")
            with self._changed:
                self._pending.remove(job)
                self.running = None
                if not self._pending:
                    self.idle.set()
                self._changed.notify_all()
            if isinstance(outcome, Exception):
                job.done.set_exception(outcome)
            else:
                job.done.set_result(outcome)
