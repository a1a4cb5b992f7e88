"""One decode worker: a thread that runs completion jobs from a queue, one at a time (the CPU
is the bottleneck, and the engine's slots are not shared across threads).

A job on a slot supersedes the slot's queued or running job (a newer keystroke makes the
older completion worthless): the older job is cancelled and ends within one prefill chunk
or decode step. A full queue refuses new jobs instead of growing without bound.
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
    on_text: Callable[[str], None] | None = None  # called on the worker thread
    cancel: Cancel = field(default_factory=Cancel)
    superseded: bool = False
    done: Future = field(default_factory=Future)  # -> list[Result]


class Worker:
    def __init__(self, engine: Engine, max_queue: int = 16, on_finish: Callable[[Job, float], None] | None = None):
        self.engine, self.max_queue, self.on_finish = engine, max_queue, on_finish
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: list[Job] = []  # queued or running, oldest first
        self.running: Job | None = None
        self.idle = threading.Event()
        self.idle.set()
        self._thread = threading.Thread(target=self._loop, name="pltkit-decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            for old in self._pending:
                if old.slot == job.slot and not old.cancel.cancelled:
                    old.superseded = True
                    old.cancel.cancel()
            waiting = sum(1 for j in self._pending if j is not self.running and not j.cancel.cancelled)
            if waiting >= self.max_queue:
                raise Busy(f"{waiting} requests are waiting; try again later")
            self._pending.append(job)
            self.idle.clear()
        self._queue.put(job)
        return job

    @property
    def queued(self) -> int:
        with self._lock:
            return sum(1 for j in self._pending if j is not self.running)

    def close(self) -> None:
        with self._lock:
            for job in self._pending:
                job.cancel.cancel()
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            self.running = job
            start = time.perf_counter()
            try:
                if job.cancel.cancelled:  # superseded or abandoned while waiting
                    results = [Result("", [], "cancelled")]
                else:
                    p = job.prompt
                    results = self.engine.run_all(p.ids, job.req, job.slot, job.cancel, job.on_text, p.truncated,
                                                  marks=p.marks)
                job.done.set_result(results)
            except Exception as e:  # reported to the request as a 500; the worker goes on
                log.exception("generation failed")
                job.done.set_exception(e)
            finally:
                with self._lock:
                    self._pending.remove(job)
                    self.running = None
                    if not self._pending:
                        self.idle.set()
                if self.on_finish is not None:
                    self.on_finish(job, start)
