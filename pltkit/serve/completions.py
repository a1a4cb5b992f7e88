"""The completion routes (every protocol of pltkit.serve.protocols and pltkit.serve.chat): a
request parsed and laid out off the event loop, queued for the worker, answered whole or streamed,
and cancelled when its client disconnects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pltkit.runtime.completion import Prompt
from pltkit.serve.body import off_loop, parse_json, read_body
from pltkit.serve.chat import CHAT_ROUTES, chat_prompt
from pltkit.serve.errors import HTTPError
from pltkit.serve.info import check_model_name
from pltkit.serve.loading import ServedModel
from pltkit.serve.parsing import Call
from pltkit.serve.protocols import COMPLETION_ROUTES, Ollama, ndjson, sse
from pltkit.serve.server import Limits, Server
from pltkit.serve.worker import Job

log = logging.getLogger(__name__)

PROTOCOLS = {**COMPLETION_ROUTES, **CHAT_ROUTES}  # route path -> protocol


async def until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def slot_key(call: Call, request: Request) -> Hashable:
    """id_slot when given; else one slot per client (address and user agent)."""
    if call.id_slot is not None:
        return call.id_slot
    host = request.client.host if request.client else "local"
    return ("client", host, request.headers.get("user-agent", ""))


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


def prepare(proto, body: bytes, model: ServedModel, limits: Limits) -> tuple[Call, Prompt | None]:
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
    body = proto.error(status, message)
    return ndjson(body) if proto.media_type == Ollama.media_type else sse(body)


def check_limits(call: Call, limits: Limits) -> None:
    """Refuses what exceeds the limits; n_predict -1 (until something else stops it) means the limit."""
    if call.req.n_predict == -1:
        call.req = replace(call.req, n_predict=limits.max_predict)
    if call.req.n_predict > limits.max_predict:
        raise HTTPError(400, f"n_predict {call.req.n_predict} exceeds this server's limit of {limits.max_predict}")
    if call.id_slot is not None and call.id_slot >= limits.slots:
        raise HTTPError(400, f"id_slot {call.id_slot} out of range: this server has slots 0..{limits.slots - 1}")

