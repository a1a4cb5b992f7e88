"""plt-serve's server state and lifecycle: its limits, the model (loaded in the background:
/health answers 503 until it is in, 500 if loading failed), the decode worker and the metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pltkit.runtime.engine import Result
from pltkit.serve.errors import HTTPError
from pltkit.serve.loading import ServedModel
from pltkit.serve.metrics import Metrics
from pltkit.serve.access import Access
from pltkit.serve.worker import Job, Worker

log = logging.getLogger(__name__)

CLIENT_SLOTS = 64  # slot states kept for clients without an id_slot, besides the numbered slots


@dataclass(frozen=True)
class Limits:
    max_body: int = 4 << 20  # bytes of a request body
    body_timeout: float = 30.0  # seconds to receive a request body (a slow sender holds a connection, no more)
    max_predict: int = 4096  # n_predict / max_tokens / num_predict
    slots: int = 16  # id_slot values 0 .. slots-1 (clients without one get a slot of their own)
    max_queue: int = 16  # jobs waiting for the worker

    @property
    def engine_slots(self) -> int:
        """The slots whose states the engine keeps: the numbered ones, then clients' (all within
        the engine's cache_bytes)."""
        return self.slots + CLIENT_SLOTS


class Server:
    """The model (loaded in the background: /health answers 503 until it is in) and its worker.
    load(max_slots=N) opens the model with an engine that keeps N slots' states (Limits.engine_slots).
    on_loaded(server) is called on the loading thread once loading succeeded or failed."""

    def __init__(self, load: Callable[..., ServedModel], limits: Limits = Limits(), api_key: str | None = None,
                 on_loaded: Callable[[Server], None] | None = None, access: Access = Access()):
        self.load, self.limits, self.api_key, self.on_loaded = load, limits, api_key, on_loaded
        self.access = access
        self.metrics = Metrics()
        self.model: ServedModel | None = None
        self.worker: Worker | None = None
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self._loader: threading.Thread | None = None

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load, name="pltkit-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            model = self.load(max_slots=self.limits.engine_slots)
            self.worker = Worker(model.engine, self.limits.max_queue, self._finished)
            self.model = model
        except Exception as e:  # reported by /health and every route
            log.debug("loading the model failed", exc_info=True)
            self.load_error = f"loading the model failed: {e}"
        finally:
            self.loaded.set()
        if self.on_loaded is not None:
            self.on_loaded(self)

    def stop(self) -> None:
        """Waits for a load in progress: exiting while native code (an export, ONNX Runtime's
        session set-up) runs on another thread can abort the process."""
        if self._loader is not None and self._loader.is_alive():
            log.warning("waiting for the model to finish loading before exiting")
            self._loader.join()
        if self.worker is not None:
            self.worker.close()

    def _finished(self, job: Job, start: float, results: list[Result] | Exception) -> None:
        """Called by the worker before it answers the job and frees itself (start: time.perf_counter()
        the job began; results: the job's results, or the exception that ended it)."""
        end = time.perf_counter()
        self.metrics.job_seconds.observe(end - start)
        self.metrics.state_bytes.set(self.model.engine.state_bytes())  # on the worker thread: no race
        if job.superseded:
            self.metrics.superseded.inc()
        if isinstance(results, Exception):
            return
        for r in results:
            self.metrics.completion(r)
        if results[0].stop_type == "cancelled":
            self.metrics.cancel_seconds.observe(end - max(job.cancel.at, start))

    def ready(self) -> ServedModel:
        if self.model is None:
            raise HTTPError(500 if self.load_error else 503, self.load_error or "Loading model")
        return self.model
