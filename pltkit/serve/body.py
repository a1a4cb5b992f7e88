"""Reading a request's JSON body: application/json only, within the size and time limits, strict
JSON. Work that takes CPU time in proportion to a request's size (JSON parsing, prompt layout and
tokenizing, which the tokenizers do with the GIL released) runs on worker threads, never on the
event loop (`off_loop`): the loop only moves bytes, so a megabyte request holds up no other connection.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from pltkit.serve.errors import HTTPError

if TYPE_CHECKING:
    from pltkit.serve.server import Limits


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
