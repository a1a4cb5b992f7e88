"""plt-lsp, started as `plt-lsp --model default` over real pipes and driven by pytest-lsp's
client (a real LSP client). Completions are greedy (temperature 0): the server's text is
compared with what the engine gives in process for the same CompletionRequest.

No sleeps: a test waits on responses. Supersede, edits and $/cancelRequest are checked on a
request queued behind a 2-second completion of another document (the engine runs one at a time,
first in first out): the newer request, edit or cancel comes in long before the older request
can start, so the outcome does not depend on which completion finishes first."""

import asyncio
import sys
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types as t
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig, LanguageClient

from pltkit.runtime.completion import CompletionRequest

PLT_LSP = str(Path(sys.executable).parent / "plt-lsp")
ROOT = "file:///project"
MAIN, OTHER = f"{ROOT}/main.py", f"{ROOT}/util.py"
CODE = "def add(a, b):\n    ret\n\nprint(add(1, 2))\n"
LONG = "# numbers\n1, 2, 3, 4, 5,\n"  # the default model repeats " 0," to the end of its context (~2 s)
OPTIONS = {"n_predict": 32, "context_tokens": 1024}

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def engine():
    from pltkit.model.tokenizer import PLTTokenizer
    from pltkit.runtime.backends import open_fastest
    from pltkit.runtime.engine import Engine

    runner, path = open_fastest("default")
    return Engine(runner, PLTTokenizer.from_dir(path))


def expected(engine, prefix, prompt, suffix, n_predict=32, **kw) -> str:
    req = CompletionRequest(prefix=prefix, prompt=prompt, suffix=suffix, n_predict=n_predict, **kw)
    return engine.complete(req, slot_id="test").text


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[PLT_LSP, "--model", "default"]))
async def client(lsp_client: LanguageClient):
    caps = t.ClientCapabilities(workspace=t.WorkspaceClientCapabilities(configuration=True))
    lsp_client.initialize_result = await lsp_client.initialize_session(
        t.InitializeParams(capabilities=caps, root_uri=ROOT, initialization_options={"pltkit": OPTIONS}))
    yield
    await lsp_client.shutdown_session()


def open_doc(client, uri, text, version=1):
    client.text_document_did_open(t.DidOpenTextDocumentParams(t.TextDocumentItem(uri, "python", version, text)))


def send(client, method, params, msg_id=None):
    """A request sent now, in the order of the calls (the client's *_async methods send it only
    when awaited): a future of its answer."""
    return asyncio.wrap_future(client.protocol.send_request(method, params, msg_id=msg_id))


def inline(client, uri, line, character, msg_id=None):
    return send(client, t.TEXT_DOCUMENT_INLINE_COMPLETION, t.InlineCompletionParams(
        t.InlineCompletionContext(t.InlineCompletionTriggerKind.Invoked), t.TextDocumentIdentifier(uri),
        t.Position(line, character)), msg_id)


def completion(client, uri, line, character):
    return send(client, t.TEXT_DOCUMENT_COMPLETION, t.CompletionParams(t.TextDocumentIdentifier(uri),
                                                                        t.Position(line, character)))


def text_of(answer) -> str:
    items = answer.items if answer is not None else []
    assert len(items) <= 1
    return items[0].insert_text if items else ""


def configure(client, **settings):
    client.workspace_did_change_configuration(t.DidChangeConfigurationParams(settings={"pltkit": settings}))


async def test_initialize_advertises_the_capabilities(client):
    caps = client.initialize_result.capabilities
    assert client.initialize_result.server_info.name == "plt-lsp"
    assert caps.inline_completion_provider
    assert caps.completion_provider is not None
    sync = caps.text_document_sync
    assert (sync.change if isinstance(sync, t.TextDocumentSyncOptions) else sync) == t.TextDocumentSyncKind.Incremental


async def test_inline_completion_is_the_engines(client, engine):
    open_doc(client, MAIN, CODE)
    answer = await inline(client, MAIN, 1, 7)
    want = expected(engine, "def add(a, b):\n", "    ret", "\n\nprint(add(1, 2))\n")
    assert want and text_of(answer) == want
    assert answer.items[0].range == t.Range(t.Position(1, 7), t.Position(1, 7))


async def test_completion_item_inserts_at_the_cursor(client, engine):
    open_doc(client, MAIN, CODE)
    answer = await completion(client, MAIN, 1, 7)
    want = expected(engine, "def add(a, b):\n", "    ret", "\n\nprint(add(1, 2))\n")
    (item,) = answer.items
    assert item.text_edit.new_text == want and want
    assert item.text_edit.range == t.Range(t.Position(1, 7), t.Position(1, 7))
    assert item.insert_text_format == t.InsertTextFormat.PlainText


async def test_incremental_edits_are_applied(client, engine):
    open_doc(client, MAIN, "def f(x):\n    pass\n")
    edits = [t.TextDocumentContentChangePartial(t.Range(t.Position(1, 4), t.Position(1, 8)), "return x *"),
             t.TextDocumentContentChangePartial(t.Range(t.Position(0, 4), t.Position(0, 5)), "double"),
             t.TextDocumentContentChangePartial(t.Range(t.Position(2, 0), t.Position(2, 0)), "\nprint(double(3))\n")]
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        t.VersionedTextDocumentIdentifier(uri=MAIN, version=2), edits))
    answer = await inline(client, MAIN, 1, 14)
    want = expected(engine, "def double(x):\n", "    return x *", "\n\nprint(double(3))\n")
    assert want and text_of(answer) == want


async def test_other_documents_are_extra_context(client, engine):
    util = "def triple(n):\n    return 3 * n\n"
    open_doc(client, OTHER, util)
    open_doc(client, MAIN, "x = tri")
    want = expected(engine, "", "x = tri", "", extra=(("util.py", util),), filename="main.py")
    alone = expected(engine, "", "x = tri", "")
    assert want != alone  # the extra context changes the answer
    assert text_of(await inline(client, MAIN, 0, 7)) == want
    configure(client, context_tokens=0)  # no room: the other document is left out
    assert text_of(await inline(client, MAIN, 0, 7)) == alone


async def test_options_take_effect(client, engine):
    open_doc(client, MAIN, CODE)
    full = expected(engine, "def add(a, b):\n", "    ret", "\n\nprint(add(1, 2))\n", n_predict=128)
    configure(client, n_predict=128)
    assert text_of(await inline(client, MAIN, 1, 7)) == full
    assert "\n" in full
    configure(client, single_line=True)
    one_line = text_of(await inline(client, MAIN, 1, 7))
    assert one_line and "\n" not in one_line and full.startswith(one_line)
    configure(client, n_predict=1, single_line=False)
    short = text_of(await inline(client, MAIN, 1, 7))
    assert short == expected(engine, "def add(a, b):\n", "    ret", "\n\nprint(add(1, 2))\n", n_predict=1)
    assert len(engine.tok.encode(short)) <= 1


async def test_the_configuration_is_pulled(client, engine):
    """didChangeConfiguration without settings: the server asks workspace/configuration "pltkit"."""
    open_doc(client, MAIN, CODE)
    asked = asyncio.Event()
    answer = client.get_configuration

    def get_configuration(**kw):
        asked.set()
        return answer(**kw)

    client.get_configuration = get_configuration
    client.set_configuration({"n_predict": 1}, section="pltkit")
    client.workspace_did_change_configuration(t.DidChangeConfigurationParams(settings=None))
    await asked.wait()
    with pytest.raises(JsonRpcException):  # a round trip: the client's answer is in the pipe before the next request
        await inline(client, f"{ROOT}/nowhere.py", 0, 0)
    short = text_of(await inline(client, MAIN, 1, 7))
    assert short == expected(engine, "def add(a, b):\n", "    ret", "\n\nprint(add(1, 2))\n", n_predict=1)


async def test_bad_requests_are_errors_and_the_server_goes_on(client, engine):
    open_doc(client, MAIN, CODE)
    for uri, line, character in [(f"{ROOT}/nowhere.py", 0, 0), (MAIN, 99, 0), (MAIN, 0, 99), (MAIN, 4, 1)]:
        with pytest.raises(JsonRpcException) as e:
            await inline(client, uri, line, character)
        assert e.value.code == -32602, (uri, line, character)
    with pytest.raises(JsonRpcException) as e:
        await completion(client, MAIN, 5, 1)
    assert e.value.code == -32602
    for params in [{"textDocument": 5}, {"textDocument": {"uri": MAIN}, "position": {"line": -1, "character": 0}},
                   {"textDocument": {"uri": MAIN}, "position": {"line": 0, "character": "x"}}]:  # malformed
        client.protocol.get_message_type = lambda method: None  # sent as given, not as InlineCompletionParams
        with pytest.raises(JsonRpcException) as e:
            await asyncio.wait_for(send(client, t.TEXT_DOCUMENT_INLINE_COMPLETION, params), 60)  # not hang
        del client.protocol.get_message_type
        assert e.value.code == -32602, params
    assert text_of(await inline(client, MAIN, 4, 0)) == expected(engine, CODE, "", "")  # the end of the document
    assert text_of(await inline(client, MAIN, 1, 7)) == expected(engine, "def add(a, b):\n", "    ret",
                                                                 "\n\nprint(add(1, 2))\n")


async def test_a_newer_request_supersedes_an_older(client, engine):
    """Both wait behind a 2-second completion in util.py (one worker, first in first out): the
    newer comes in long before the older could start, whichever of them finishes first."""
    open_doc(client, OTHER, LONG)
    open_doc(client, MAIN, CODE)
    configure(client, n_predict=4096)
    busy, first, second = inline(client, OTHER, 1, 14), inline(client, MAIN, 1, 7), inline(client, MAIN, 1, 7)
    want = expected(engine, "def add(a, b):\n", "    ret", "\n\nprint(add(1, 2))\n", n_predict=4096,
                    extra=(("util.py", LONG),), filename="main.py")
    results = await asyncio.gather(first, second, busy)
    assert [text_of(r) for r in results[:2]] == ["", want] and want
    assert text_of(results[2])


async def test_an_edit_makes_a_running_completion_empty(client, engine):
    """The completion in main.py waits behind a 2-second one in util.py (one worker): the edit
    that follows its request comes in long before it can run."""
    open_doc(client, OTHER, LONG)
    open_doc(client, MAIN, CODE)
    configure(client, n_predict=4096)
    busy, stale = inline(client, OTHER, 1, 14), inline(client, MAIN, 1, 7)
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        t.VersionedTextDocumentIdentifier(uri=MAIN, version=2), [t.TextDocumentContentChangeWholeDocument("x = 1\n")]))
    assert text_of(await stale) == ""
    assert text_of(await busy)
    assert text_of(await inline(client, MAIN, 1, 0)) == expected(engine, "x = 1\n", "", "", n_predict=4096,
                                                                 extra=(("util.py", LONG),), filename="main.py")


async def test_cancel_request(client, engine):
    """$/cancelRequest of a request waiting behind a 2-second one: RequestCancelled; the server
    answers the next one."""
    open_doc(client, OTHER, LONG)
    open_doc(client, MAIN, CODE)
    configure(client, n_predict=4096)
    busy, request = inline(client, OTHER, 1, 14), inline(client, MAIN, 1, 7, msg_id="waiting")
    client.cancel_request(t.CancelParams(id="waiting"))
    with pytest.raises(JsonRpcException) as e:
        await request
    assert e.value.code == -32800
    assert text_of(await busy)
    want = expected(engine, "def add(a, b):\n", "    ret", "\n\nprint(add(1, 2))\n", n_predict=4096,
                    extra=(("util.py", LONG),), filename="main.py")
    assert text_of(await inline(client, MAIN, 1, 7)) == want


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[PLT_LSP, "--model", "default"]))
async def bare(lsp_client: LanguageClient):
    yield


async def test_shutdown_and_exit(bare):
    await bare.initialize_session(t.InitializeParams(capabilities=t.ClientCapabilities()))
    assert await bare.shutdown_async(None) is None
    bare.exit(None)
    assert await bare._server.wait() == 0


async def test_the_documents_kept_are_bounded(client, engine):
    """At most 64 documents (the least recently edited is dropped) of at most 1 MiB each."""
    for i in range(65):
        open_doc(client, f"{ROOT}/f{i}.py", f"x{i} = {i}\n")
    with pytest.raises(JsonRpcException) as e:  # f0 was dropped
        await inline(client, f"{ROOT}/f0.py", 0, 0)
    assert e.value.code == -32602
    configure(client, n_predict=4, context_tokens=0)
    assert text_of(await inline(client, f"{ROOT}/f1.py", 1, 0)) == expected(engine, "x1 = 1\n", "", "", n_predict=4)
    open_doc(client, f"{ROOT}/big.py", "x" * (1 << 20) + "\n")
    with pytest.raises(JsonRpcException) as e:
        await inline(client, f"{ROOT}/big.py", 0, 0)
    assert e.value.code == -32602
