"""plt-lsp's handlers (pygls): document sync, textDocument/inlineCompletion (ghost text) and
textDocument/completion (one item inserting the completion at the cursor), both on the engine's
slot for the document (prefix reuse), one at a time on the worker thread. The completion
handlers are generators: pygls runs their first part as the request comes in, in stream order.

A newer completion request for a document cancels the older one still running, which answers
empty; so does a completion whose document changed (its version) while it ran: never stale text.
$/cancelRequest stops the engine and answers RequestCancelled. An unknown document or a position
outside it is an InvalidParams error; the server goes on. A didChange of a document the server
does not keep (never opened, closed, or dropped by the bounds) is ignored, with a warning.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol, lsp_method

import pltkit
from pltkit.lsp.documents import Documents, PositionError
from pltkit.lsp.options import Options, merged, section
from pltkit.lsp.worker import Job, Worker
from pltkit.runtime.completion import RequestError
from pltkit.runtime.engine import Engine

log = logging.getLogger(__name__)
IGNORED = SimpleNamespace(jsonrpc="ignored")  # a message pygls's handle_message skips


class Protocol(LanguageServerProtocol):
    def structure_message(self, data):
        """A request whose params do not parse gets an InvalidParams error (pygls would log it and
        never answer, leaving the client waiting)."""
        try:
            return super().structure_message(data)
        except Exception as e:
            if not isinstance(data.get("id"), (int, str)) or "method" not in data:
                raise
            error = e if isinstance(e, JsonRpcException) else JsonRpcInvalidParams()
            self._send_response(data["id"], None, JsonRpcInvalidParams(
                f"invalid params for {data['method']}: {error.__cause__ or error}"[:500]).to_response_error())
            return IGNORED

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        """pygls's didChange, less its error (a window/showMessage to the user) for a document it
        does not have: that is one plt-lsp dropped, or the client's mistake, not the user's."""
        if self._server.documents.text(params.text_document.uri) is None:
            log.warning("plt-lsp: ignoring a change of %s, which is not open (or was dropped)",
                        params.text_document.uri)
            return
        yield from super().lsp_text_document__did_change(params)

    def _handle_cancel_notification(self, msg_id):
        """$/cancelRequest: pygls answers RequestCancelled; the engine stops too."""
        self._server.worker.cancel(msg_id)
        super()._handle_cancel_notification(msg_id)


class PltLanguageServer(LanguageServer):
    def __init__(self, engine: Engine):
        super().__init__("plt-lsp", pltkit.__version__, text_document_sync_kind=types.TextDocumentSyncKind.Incremental,
                         protocol_cls=Protocol)
        self.engine, self.options = engine, Options()
        self.documents = Documents(lambda: self.workspace, engine.tok)
        self.worker = Worker(engine)

    def configure(self, raw) -> None:
        self.options = merged(self.options, section(raw))
        log.info("plt-lsp: options %s", self.options)

    def start(self, uri: str, position: types.Position) -> Job:
        """Queue the completion at a position, as its request comes in (so that an edit or a newer
        request that follows it in the stream supersedes it)."""
        try:
            req = self.documents.request(uri, position.line, position.character, self.options,
                                         self.options.context_tokens)
        except (PositionError, RequestError) as e:
            raise JsonRpcInvalidParams(str(e)) from None
        return self.worker.submit(req, Job(uri, self.documents.version(uri), self.protocol.msg_id))

    async def finish(self, job: Job) -> str:
        """The job's text; "" when superseded, or when the document changed while it ran."""
        try:
            result = await self.worker.result(job)
        except RequestError as e:
            raise JsonRpcInvalidParams(str(e)) from None
        if result is None or self.documents.version(job.uri) != job.version:
            return ""
        return result.text


def create_server(engine: Engine) -> PltLanguageServer:
    server = PltLanguageServer(engine)
    _sync_features(server)
    _completion_features(server)
    return server


def _sync_features(server: PltLanguageServer) -> None:
    @server.feature(types.INITIALIZE)
    def initialize(ls: PltLanguageServer, params: types.InitializeParams):
        ls.configure(params.initialization_options)

    @server.feature(types.INITIALIZED)
    async def initialized(ls: PltLanguageServer, params: types.InitializedParams):
        await pull_configuration(ls)

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    async def did_change_configuration(ls: PltLanguageServer, params: types.DidChangeConfigurationParams):
        if isinstance(params.settings, dict) and isinstance(params.settings.get("pltkit"), dict):
            ls.configure(params.settings)
        else:
            await pull_configuration(ls)

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: PltLanguageServer, params: types.DidOpenTextDocumentParams):
        _touched(ls, params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: PltLanguageServer, params: types.DidChangeTextDocumentParams):
        ls.worker.forget(params.text_document.uri)  # its completion would be stale
        _touched(ls, params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: PltLanguageServer, params: types.DidCloseTextDocumentParams):
        ls.documents.closed(params.text_document.uri)
        ls.worker.forget(params.text_document.uri)

    @server.feature(types.SHUTDOWN)
    def shutdown(ls: PltLanguageServer, params):
        ls.worker.stop()


def _touched(ls: PltLanguageServer, uri: str) -> None:
    for dropped in ls.documents.touched(uri):
        ls.worker.forget(dropped)
        log.warning("plt-lsp: dropped %s (at most %d documents of %d characters kept)", dropped,
                    ls.documents.max_documents, ls.documents.max_chars)


async def pull_configuration(ls: PltLanguageServer) -> None:
    """Ask the client for the "pltkit" section, when it can answer."""
    caps = ls.client_capabilities.workspace
    if caps is None or not caps.configuration:
        return
    try:
        items = await ls.workspace_configuration_async(
            types.ConfigurationParams(items=[types.ConfigurationItem(section="pltkit")]))
    except Exception as e:  # a client that fails the request keeps the options as they are
        log.warning("plt-lsp: workspace/configuration failed: %s", e)
        return
    if items:
        ls.configure(items[0])


def _completion_features(server: PltLanguageServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    def inline_completion(ls: PltLanguageServer, params: types.InlineCompletionParams):
        pos = params.position
        text = yield ls.finish, (ls.start(params.text_document.uri, pos),), None
        items = [types.InlineCompletionItem(insert_text=text, range=types.Range(pos, pos))] if text else []
        return types.InlineCompletionList(items=items)

    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
    def completion(ls: PltLanguageServer, params: types.CompletionParams):
        pos = params.position
        text = yield ls.finish, (ls.start(params.text_document.uri, pos),), None
        if not text:
            return types.CompletionList(is_incomplete=True, items=[])
        label = next((line.strip() for line in text.splitlines() if line.strip()), text)
        item = types.CompletionItem(label=label, kind=types.CompletionItemKind.Text, detail="plt-lsp",
                                    insert_text_format=types.InsertTextFormat.PlainText,
                                    text_edit=types.TextEdit(range=types.Range(pos, pos), new_text=text),
                                    sort_text="0")
        return types.CompletionList(is_incomplete=True, items=[item])
