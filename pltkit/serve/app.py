"""plt-serve's HTTP application (Starlette): the routes, limits, errors, streaming and
cancellation. The model loads in the background; until it is in, /health answers 503.

Every error is JSON with a 4xx/5xx status, in the shape of the route's protocol; a failure
inside generation is a 500 for that request and the worker goes on with the next.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from pltkit.runtime.chat import ChatTemplate
from pltkit.runtime.completion import Prompt, RequestError
from pltkit.runtime.engine import Engine, Result
from pltkit.serve.chat import CHAT_ROUTES, chat_prompt
from pltkit.serve.metrics import Metrics
from pltkit.serve.protocols import COMPLETION_ROUTES, Call, LlamaCpp, Ollama, model_name
from pltkit.serve.worker import Busy, Job, Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_body: int = 4 << 20  # bytes of a request body
    body_timeout: float = 30.0  # seconds to receive a request body (a slow sender holds a connection, no more)
    max_predict: int = 4096  # n_predict / max_tokens / num_predict
    slots: int = 16  # id_slot values 0 .. slots-1 (clients without one get a slot of their own)
    max_queue: int = 16  # jobs waiting for the worker


@dataclass
class Model:
    """What the loader returns: the engine and how to describe the model."""

    engine: Engine
    name: str
    details: dict
    chat: ChatTemplate | None = None  # None: the model has no chat template, no chat routes


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Access:
    """Who may talk to the server over TCP, as a browser would show it. A web page can make the
    browser send requests anywhere: a foreign Host header (DNS rebinding) or a foreign Origin (a
    cross-origin page) gets 403. Host names are compared without their port; "*" allows any. A
    request without an Origin (editors, curl) is not a browser's cross-origin request. Unix-socket
    clients are not checked: browsers cannot reach them, and file permissions guard them."""

    hosts: tuple[str, ...] = LOOPBACK_HOSTS
    origins: tuple[str, ...] = ()  # besides the server's own origin

    def refusal(self, scope) -> str | None:
        """Why a request is refused, or None."""
        if (scope.get("server") or ("", 0))[1] is None:  # a Unix socket
            return None
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if host and "*" not in self.hosts and host_name(host) not in self.hosts:
            return f"Host {host!r} is not allowed (plt-serve --allowed-hosts)"
        origin = headers.get(b"origin", b"").decode("latin-1").strip().lower().rstrip("/")
        if origin and "*" not in self.origins and origin not in self.origins and origin != f"http://{host}":
            return f"Origin {origin!r} is not allowed (plt-serve --allowed-origins)"
        return None


def host_name(host: str) -> str:
    """A Host header's name without its port: 'localhost:8012' -> 'localhost', '[::1]:80' -> '::1'."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Server:
    """The model (loaded in the background: /health answers 503 until it is in) and its worker.
    on_loaded(server) is called on the loading thread once loading succeeded or failed."""

    def __init__(self, load: Callable[[], Model], limits: Limits = Limits(), api_key: str | None = None,
                 on_loaded: Callable[[Server], None] | None = None, access: Access = Access()):
        self.load, self.limits, self.api_key, self.on_loaded = load, limits, api_key, on_loaded
        self.access = access
        self.metrics = Metrics()
        self.model: Model | None = None
        self.worker: Worker | None = None
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self._loader: threading.Thread | None = None

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load, name="pltkit-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            model = self.load()
            model.engine.max_slots = self.limits.slots + 64  # numbered slots, then clients (all within --cache-mb)
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

    def ready(self) -> Model:
        if self.model is None:
            raise HTTPError(500 if self.load_error else 503, self.load_error or "Loading model")
        return self.model


# --- helpers ------------------------------------------------------------------------------
# Work that takes CPU time in proportion to a request's size (JSON parsing, prompt layout and
# tokenizing, which the tokenizers do with the GIL released) runs on worker threads, never on the
# event loop: the loop only moves bytes, so a megabyte request holds up no other connection.
off_loop = run_in_threadpool


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body of a JSON request: application/json only, at most limits.max_body bytes, received
    within limits.body_timeout seconds."""
    # a page can POST text/plain anywhere without the browser asking first (a CORS "simple request"):
    # a JSON API that takes only application/json is out of its reach
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise HTTPError(415, f"Content-Type must be application/json (got {media or 'none'!r})")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_body:
        raise HTTPError(413, f"request body of {length} bytes exceeds the limit of {limits.max_body}")

    async def receive() -> bytes:
        body, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body:
                raise HTTPError(413, f"request body exceeds the limit of {limits.max_body} bytes")
            body.append(chunk)
        return b"".join(body)

    try:
        return await asyncio.wait_for(receive(), limits.body_timeout)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"request body not received within {limits.body_timeout:g} s") from None


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:20]} is out of range")
    return x


LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # only a \u escape can bring one into the text


def parse_json(body: bytes):
    """Strict JSON (no NaN or Infinity, no number beyond a float's range, text that is valid
    Unicode: a lone surrogate escape has no UTF-8 form), or HTTPError 400."""
    try:
        # decoded here, strictly: json.loads(bytes) would let UTF-8-encoded surrogates through
        value = json.loads(body.decode("utf-8"), parse_constant=_not_json, parse_float=_finite)
        if LONE_SURROGATE.search(body):
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value
    except UnicodeEncodeError:
        raise HTTPError(400, "malformed JSON: a \\u escape encodes a lone surrogate, which is not text") from None
    except RecursionError:
        raise HTTPError(400, "malformed JSON: nested too deeply") from None
    except UnicodeDecodeError as e:
        raise HTTPError(400, f"malformed JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise HTTPError(400, f"malformed JSON: {e}") from None


async def read_json(request: Request, limits: Limits):
    return await off_loop(parse_json, await read_body(request, limits))


async def until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def slot_key(call: Call, request: Request) -> Hashable:
    """id_slot when given; else one slot per client (address and user agent)."""
    if call.id_slot is not None:
        return call.id_slot
    host = request.client.host if request.client else "local"
    return ("client", host, request.headers.get("user-agent", ""))


# --- completion routes --------------------------------------------------------------------
async def complete(request: Request) -> Response:
    server: Server = request.app.state.server
    proto = PROTOCOLS[request.url.path]
    model = server.ready()
    body = await read_body(request, server.limits)
    call, prompt = await off_loop(prepare, proto, body, model, server.limits)
    if prompt is None:
        return JSONResponse(proto.loaded(call, model.name))
    slot = slot_key(call, request)
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    on_text = (lambda text, r: loop.call_soon_threadsafe(pieces.put_nowait, (text, len(r.tokens), r.tokens_evaluated))
               ) if call.stream else None
    job = Job(call.req, slot, prompt, on_text, editor=call.chat is None)
    server.worker.submit(job)
    server.metrics.queue.set(server.worker.queued)
    shown_slot = call.id_slot if call.id_slot is not None else -1
    gone = asyncio.ensure_future(until_disconnect(request))  # ends at a disconnect or the response's end
    gone.add_done_callback(lambda _: job.cancel.cancel())  # no-op once the job is done
    if call.stream:
        job.done.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        return StreamingResponse(stream(proto, call, job, pieces, model.name, shown_slot),
                                 media_type=proto.media_type)
    done = asyncio.wrap_future(job.done)
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not done.done():  # the client left (or this task was cancelled): drop the work
            job.cancel.cancel()
    results = await done
    return JSONResponse(proto.response(call, results, model.name, shown_slot))


def prepare(proto, body: bytes, model: Model, limits: Limits) -> tuple[Call, Prompt | None]:
    """A completion request's body parsed, checked and laid out as a prompt (None: a load request,
    nothing to generate). Runs off the event loop; a bad request is a 4xx before any streaming."""
    call = proto.parse(parse_json(body))
    if call.model is not None:
        check_model_name(call.model, model)
    if call.load:
        return call, None
    if call.chat is not None:
        chat_prompt(model, call)
    check_limits(call, limits)
    call.state["n_ctx"] = model.engine.context
    prompt = model.engine.prompt(call.req, call.ids)
    call.state["prefix_only"] = prompt.parts.get("prefix_only", False)
    return call, prompt


async def stream(proto, call: Call, job: Job, pieces: asyncio.Queue, name: str, slot):
    """The response body of a streaming request. A disconnect cancels the job through the
    watcher in `complete` (the job stops within one decode step), and Starlette stops this."""
    try:
        while (item := await pieces.get()) is not None:
            text, call.state["tokens_predicted"], call.state["tokens_evaluated"] = item
            if chunk := proto.piece(call, text, name, slot):
                yield chunk
        try:
            results = job.done.result()
        except Exception as e:
            log.error("generation failed: %s", e)
            yield error_event(proto, 500, f"generation failed: {e}")
            return
        yield proto.end(call, results, name, slot)
    finally:
        job.cancel.cancel()


def error_event(proto, status: int, message: str) -> bytes:
    body = json.dumps(proto.error(status, message))
    return (body + "\n").encode() if proto.media_type == Ollama.media_type else f"data: {body}\n\n".encode()


def check_limits(call: Call, limits: Limits) -> None:
    """Refuses what exceeds the limits; n_predict -1 (until something else stops it) means the limit."""
    if call.req.n_predict == -1:
        call.req = replace(call.req, n_predict=limits.max_predict)
    if call.req.n_predict > limits.max_predict:
        raise HTTPError(400, f"n_predict {call.req.n_predict} exceeds this server's limit of {limits.max_predict}")
    if call.id_slot is not None and call.id_slot >= limits.slots:
        raise HTTPError(400, f"id_slot {call.id_slot} out of range: this server has slots 0..{limits.slots - 1}")


PROTOCOLS = {**COMPLETION_ROUTES, **CHAT_ROUTES}


# --- other routes -------------------------------------------------------------------------
async def health(request: Request) -> Response:
    server: Server = request.app.state.server
    server.ready()
    return JSONResponse({"status": "ok"})


def abilities(model: Model) -> dict:
    """What the model can serve: chat (it has a chat template) and infill with FIM tokens."""
    return {"chat": model.chat is not None, "infill": model.engine.tok.fim is not None}


def model_entry(model: Model) -> dict:
    return {"id": model.name, "object": "model", "created": model.details.get("modified", 0), "owned_by": "pltkit",
            "meta": {**model.details, **abilities(model)}}


async def models(request: Request) -> Response:
    model = request.app.state.server.ready()
    return JSONResponse({"object": "list", "data": [model_entry(model)]})


async def model_by_id(request: Request) -> Response:
    model = request.app.state.server.ready()
    if request.path_params["id"] != model.name:
        raise HTTPError(404, f"model {request.path_params['id']!r} not found: this server has {model.name!r}")
    return JSONResponse(model_entry(model))


def check_model_name(name: str, model: Model) -> None:
    """Ollama's names carry a tag (":latest" when none is given); an unknown name is a 404, as there."""
    if name not in (model.name, f"{model.name}:latest"):
        raise HTTPError(404, f"model {name!r} not found: this server has {model.name!r}")


async def props(request: Request) -> Response:
    server: Server = request.app.state.server
    model = server.ready()
    return JSONResponse({"model_path": model.name, "total_slots": server.limits.slots,
                         "n_ctx": model.engine.context, "build_info": "pltkit",
                         **abilities(model), "chat_template": model.chat.source if model.chat else "",
                         "default_generation_settings": {"n_ctx": model.engine.context, **LlamaCpp.defaults},
                         "limits": {"max_body": server.limits.max_body, "max_predict": server.limits.max_predict,
                                    "max_queue": server.limits.max_queue}})


TOKENIZE_CONTEXTS = 4  # /tokenize takes texts of up to this many contexts' worth of characters


async def tokenize(request: Request) -> Response:
    server: Server = request.app.state.server
    engine = server.ready().engine
    tok = engine.tok
    body = await read_json(request, server.limits)
    content = body.get("content") if isinstance(body, dict) else None
    if not isinstance(content, str) or any(not isinstance(body.get(k, False), bool)
                                           for k in ("parse_special", "with_pieces")):
        raise HTTPError(400, "tokenize needs {\"content\": string, \"parse_special\"?: bool, \"with_pieces\"?: bool}")
    limit = TOKENIZE_CONTEXTS * engine.context_chars
    if len(content) > limit:  # more tokens than any prompt could use: not worth the time and memory
        raise HTTPError(413, f"content of {len(content)} characters exceeds the limit of {limit} "
                             f"({TOKENIZE_CONTEXTS} contexts of {engine.context} tokens)")
    def run() -> JSONResponse:  # the answer's JSON too: a context's worth of tokens
        ids = tok.encode_with_specials(content) if body.get("parse_special") else tok.encode(content)
        if body.get("with_pieces"):
            return JSONResponse({"tokens": [{"id": i, "piece": tok.decode_continuation([i])} for i in ids]})
        return JSONResponse({"tokens": ids})

    return await off_loop(run)


async def detokenize(request: Request) -> Response:
    server: Server = request.app.state.server
    tok = server.ready().engine.tok
    body = await read_json(request, server.limits)
    ids = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not await off_loop(lambda: all(type(i) is int and 0 <= i < tok.vocab_size
                                                                   for i in ids)):
        raise HTTPError(400, f"detokenize needs {{\"tokens\": [ids in 0..{tok.vocab_size - 1}]}}")
    return await off_loop(lambda: JSONResponse({"content": tok.decode(ids)}))


async def metrics(request: Request) -> Response:
    server: Server = request.app.state.server
    if server.worker is not None:
        server.metrics.queue.set(server.worker.queued)
        server.metrics.busy.set(0 if server.worker.idle.is_set() else 1)
    return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")


# Ollama's model listing and metadata
def ollama_template(model: Model) -> str:
    fim = model.engine.tok.fim
    if fim is None:
        return "{{ .Prompt }}"
    t = model.engine.tok.id_to_token
    return (f"{{{{- if .Suffix }}}}{t(fim.prefix)}{{{{ .Prompt }}}}{t(fim.suffix)}{{{{ .Suffix }}}}"
            f"{t(fim.middle)}{{{{- else }}}}{{{{ .Prompt }}}}{{{{- end }}}}")


def ollama_details(model: Model) -> dict:
    return {"format": model.details.get("format", ""), "family": "plt", "families": ["plt"],
            "parameter_size": model.details.get("parameter_size", ""),
            "quantization_level": model.details.get("precision", "").upper()}


async def ollama_tags(request: Request) -> Response:
    model = request.app.state.server.ready()
    modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(model.details.get("modified", 0)))
    return JSONResponse({"models": [{"name": model.name, "model": model.name, "modified_at": modified,
                                     "size": model.details.get("size_bytes", 0), "digest": "",
                                     "details": ollama_details(model)}]})


async def ollama_show(request: Request) -> Response:
    server: Server = request.app.state.server
    model = server.ready()
    body = await read_json(request, server.limits)
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    check_model_name(model_name(body), model)
    caps = ["completion"] + ["insert"] * (model.engine.tok.fim is not None) + \
        ["tools"] * bool(model.chat and model.chat.uses_tools)
    return JSONResponse({"template": ollama_template(model), "capabilities": caps, "parameters": "",
                         "license": "", "modelfile": "", "details": ollama_details(model),
                         "model_info": {"general.architecture": "plt", "plt.context_length": model.engine.context,
                                        **{f"plt.{k}": v for k, v in model.details.items()}}})


async def ollama_root(request: Request) -> Response:
    """Ollama answers its root so; some clients check it to find the server."""
    return PlainTextResponse("Ollama is running")


async def ollama_version(request: Request) -> Response:
    from importlib.metadata import version
    return JSONResponse({"version": version("pltkit")})


ROUTES = [
    Route("/health", health), Route("/props", props), Route("/v1/models", models), Route("/models", models),
    Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
    Route("/metrics", metrics),
    *(Route(path, complete, methods=["POST"]) for path in PROTOCOLS),
    Route("/api/tags", ollama_tags), Route("/api/show", ollama_show, methods=["POST"]),
    Route("/api/version", ollama_version), Route("/", ollama_root, methods=["GET", "HEAD"]),
    Route("/v1/models/{id:path}", model_by_id),
]
KNOWN_PATHS = {r.path for r in ROUTES}


# --- errors, auth and request metrics -----------------------------------------------------
def error_response(request: Request, status: int, message: str) -> JSONResponse:
    shape = Ollama if request.url.path.startswith("/api/") else LlamaCpp
    return JSONResponse(shape.error(status, message), status_code=status)


async def on_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPError):
        return error_response(request, exc.status, exc.message)
    if isinstance(exc, RequestError):
        return error_response(request, 400, str(exc))
    if isinstance(exc, Busy):
        return error_response(request, 503, f"server busy: {exc}")
    return error_response(request, exc.status_code, exc.detail or "error")  # HTTPException


def key_matches(authorization: bytes, key: str) -> bool:
    """Whether an Authorization header is 'Bearer KEY' (the scheme in any case, KEY as UTF-8 bytes,
    compared in constant time)."""
    scheme, _, token = authorization.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode("utf-8"))


class Gate:
    """ASGI middleware: Host and Origin (Access), the API key (when set; /health stays open) and
    per-route request metrics."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        start, status, started = time.perf_counter(), [500], [False]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        try:
            refusal = self.server.access.refusal(scope)
            if refusal:
                return await error_response(Request(scope), 403, refusal)(scope, receive, send_status)
            key = self.server.api_key
            if key and path != "/health":
                if not key_matches(dict(scope["headers"]).get(b"authorization", b""), key):
                    request = Request(scope)
                    return await error_response(request, 401, "invalid or missing API key (Authorization: "
                                                              "Bearer KEY)")(scope, receive, send_status)
            try:
                await self.app(scope, receive, send_status)
            except Exception as e:  # answered here: re-raised, the server would drop the connection
                if started[0]:
                    raise
                log.error("request failed: %s: %s", type(e).__name__, e)
                await error_response(Request(scope), 500, f"internal error: {type(e).__name__}: {e}")(
                    scope, receive, send_status)
        finally:
            m = self.server.metrics
            m.requests.labels(path, str(status[0])).inc()
            m.request_seconds.labels(path).observe(time.perf_counter() - start)


def create_app(server: Server) -> Starlette:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.start()
        yield
        server.stop()

    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    exception_handlers={HTTPException: on_error, HTTPError: on_error,
                                        RequestError: on_error, Busy: on_error})
    app.state.server = server
    app.add_middleware(Gate, server=server)
    return app
