"""plt-lsp, started as `plt-lsp --model default` over real pipes and driven by pytest-lsp's
client (a real LSP client). Completions are greedy (temperature 0): the server's text is
compared with what the engine gives in process for the same CompletionRequest.

No sleeps: a test waits on responses. Supersede, edits and $/cancelRequest are checked on a
request queued behind a held completion of another document (tests/lsp_held_server.py: plt-lsp
whose engine does not start a document that begins with "# hold" until that request is
cancelled; the engine runs one completion at a time, first in first out). The test sends the
held request, the messages under test, then $/cancelRequest of the held one: stream order alone
decides the outcome."""

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
HELD_SERVER = str(Path(__file__).resolve().parent / "lsp_held_server.py")
HOLD = "# hold\nx = 1\n"  # held by HELD_SERVER until its request is cancelled
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


async def initialize(lsp_client: LanguageClient) -> None:
    caps = t.ClientCapabilities(workspace=t.WorkspaceClientCapabilities(configuration=True))
    lsp_client.initialize_result = await lsp_client.initialize_session(
        t.InitializeParams(capabilities=caps, root_uri=ROOT, initialization_options={"pltkit": OPTIONS}))


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[PLT_LSP, "--model", "default"]))
async def client(lsp_client: LanguageClient):
    await initialize(lsp_client)
    yield
    await lsp_client.shutdown_session()


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[sys.executable, HELD_SERVER, "--model", "default"]))
async def held(lsp_client: LanguageClient):
    """plt-lsp whose completions in a document starting with "# hold" wait for their cancel."""
    await initialize(lsp_client)
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


async def test_a_percent_encoded_uri_is_the_same_document(client, engine):
    """Editors percent-encode uris (a space, "c%3A" for a Windows drive); pygls keys its texts decoded."""
    uri = f"{ROOT}/my%20code.py"
    open_doc(client, uri, "def f(x):\n    pass\n")
    client.text_document_did_change(t.DidChangeTextDocumentParams(t.VersionedTextDocumentIdentifier(uri=uri, version=2), [
        t.TextDocumentContentChangePartial(t.Range(t.Position(1, 4), t.Position(1, 8)), "return x *")]))
    want = expected(engine, "def f(x):\n", "    return x *", "\n")
    assert want and text_of(await inline(client, uri, 1, 14)) == want


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


async def test_sampling_options_reach_the_engine(client, engine):
    """top_k 1 before the temperature: one candidate is left, so temperature 1 draws the greedy
    text; a bad sampler name is refused and the samplers before it stay."""
    open_doc(client, MAIN, CODE)
    greedy = expected(engine, "def add(a, b):\n", "    ret", "\n\nprint(add(1, 2))\n")
    configure(client, temperature=1, top_k=1, samplers=["top_k", "temperature"])
    assert greedy and text_of(await inline(client, MAIN, 1, 7)) == greedy
    configure(client, samplers=["top_k", "bogus"])  # would fail the completion if it reached the engine
    assert text_of(await inline(client, MAIN, 1, 7)) == greedy


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


def hold(client):
    """Open util.py (HOLD) and ask a completion in it, which holds the worker until release()."""
    open_doc(client, OTHER, HOLD)
    return inline(client, OTHER, 1, 5, msg_id="busy")


def release(client) -> None:
    """$/cancelRequest of the held completion: its engine run ends, and the worker goes on."""
    client.cancel_request(t.CancelParams(id="busy"))


async def assert_cancelled(answer) -> None:
    with pytest.raises(JsonRpcException) as e:
        await answer
    assert e.value.code == -32800


MAIN_EXPECTED = dict(prefix="def add(a, b):\n", prompt="    ret", suffix="\n\nprint(add(1, 2))\n",
                     extra=(("util.py", HOLD),), filename="main.py")


async def test_a_newer_request_supersedes_an_older(held, engine):
    """Both wait behind the held completion: the newer comes in before the older can start."""
    busy = hold(held)
    open_doc(held, MAIN, CODE)
    first, second = inline(held, MAIN, 1, 7), inline(held, MAIN, 1, 7)
    release(held)
    want = expected(engine, **MAIN_EXPECTED)
    assert [text_of(await first), text_of(await second)] == ["", want] and want
    await assert_cancelled(busy)


async def test_an_edit_makes_a_running_completion_empty(held, engine):
    """The completion in main.py waits behind the held one: the edit that follows its request
    comes in before it can run."""
    busy = hold(held)
    open_doc(held, MAIN, CODE)
    stale = inline(held, MAIN, 1, 7)
    held.text_document_did_change(t.DidChangeTextDocumentParams(
        t.VersionedTextDocumentIdentifier(uri=MAIN, version=2), [t.TextDocumentContentChangeWholeDocument("x = 1\n")]))
    release(held)
    assert text_of(await stale) == ""
    await assert_cancelled(busy)
    assert text_of(await inline(held, MAIN, 1, 0)) == expected(engine, "x = 1\n", "", "", extra=(("util.py", HOLD),),
                                                               filename="main.py")


async def test_cancel_request(held, engine):
    """$/cancelRequest of a request waiting behind the held one: RequestCancelled; the server
    answers the next one."""
    busy = hold(held)
    open_doc(held, MAIN, CODE)
    request = inline(held, MAIN, 1, 7, msg_id="waiting")
    held.cancel_request(t.CancelParams(id="waiting"))
    release(held)
    await assert_cancelled(request)
    await assert_cancelled(busy)
    want = expected(engine, **MAIN_EXPECTED)
    assert want and text_of(await inline(held, MAIN, 1, 7)) == want


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


async def test_a_change_of_a_dropped_document_is_ignored(client):
    """The 65th document drops the first; a didChange of it is ignored (no window/showMessage
    error for the user) and a completion in it stays an InvalidParams error."""
    for i in range(65):
        open_doc(client, f"{ROOT}/f{i}.py", f"x{i} = {i}\n")
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        t.VersionedTextDocumentIdentifier(uri=f"{ROOT}/f0.py", version=2),
        [t.TextDocumentContentChangePartial(t.Range(t.Position(0, 0), t.Position(0, 0)), "y = 0\n")]))
    with pytest.raises(JsonRpcException) as e:  # answered after the change was handled (stream order)
        await inline(client, f"{ROOT}/f0.py", 0, 0)
    assert e.value.code == -32602 and "unknown document" in e.value.message
    assert client.messages == []
