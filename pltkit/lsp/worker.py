"""The engine is not thread-safe: every completion runs on one worker thread, in the order
submitted, off the LSP event loop. Each document (URI) has at most one live job: a newer one
cancels the older (its Cancel), which then answers empty, and so does an edit of the document."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from pltkit.runtime.completion import CompletionRequest
from pltkit.runtime.engine import Cancel, Engine, Result


@dataclass
class Job:
    uri: str
    version: int | None  # the document's version when the request came in
    key: object = None  # the request's id, for $/cancelRequest
    cancel: Cancel = field(default_factory=Cancel)
    future: Future | None = None


class Worker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plt-lsp-engine")
        self.live: dict[str, Job] = {}  # uri -> its newest job
        self.by_key: dict[object, Job] = {}  # request id -> job

    def _run(self, req: CompletionRequest, job: Job) -> Result | None:
        if job.cancel.cancelled:  # superseded, edited or cancelled while it waited
            return None
        result = self.engine.complete(req, slot_id=job.uri, cancel=job.cancel)
        return None if job.cancel.cancelled or result.stop_type == "cancelled" else result

    def submit(self, req: CompletionRequest, job: Job) -> Job:
        """Queue a job (on the event loop, as its request comes in): supersedes the document's older one."""
        self.forget(job.uri)
        self.live[job.uri] = job
        if job.key is not None:
            self.by_key[job.key] = job
        job.future = self.pool.submit(self._run, req, job)
        return job

    async def result(self, job: Job) -> Result | None:
        """The engine's result, or None when the job was superseded or cancelled."""
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancel.cancel()
            raise
        finally:
            self._done(job)

    def _done(self, job: Job) -> None:
        if self.live.get(job.uri) is job:
            del self.live[job.uri]
        if job.key is not None and self.by_key.get(job.key) is job:
            del self.by_key[job.key]

    def forget(self, uri: str) -> None:
        """An edited, closed or dropped document, or a newer request: stop its live job."""
        if (job := self.live.pop(uri, None)) is not None:
            job.cancel.cancel()

    def cancel(self, key) -> None:
        """$/cancelRequest: stop the engine on that request's job."""
        if (job := self.by_key.pop(key, None)) is not None:
            job.cancel.cancel()

    def stop(self) -> None:
        for job in list(self.live.values()):
            job.cancel.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
