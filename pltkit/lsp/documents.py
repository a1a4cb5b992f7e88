"""The open documents plt-lsp keeps, and the FIM prompt of a cursor in one of them.

pygls's workspace holds the texts (full and incremental sync). Bounds: at most MAX_DOCUMENTS
documents (opening one more drops the least recently used, which then counts as unknown, as if
closed) and MAX_CHARS characters per document (a document that grows past it is dropped until
it is opened again); a completion in a dropped document is an error, like any unknown one.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from urllib.parse import unquote, urlparse

from lsprotocol.types import Position
from pygls.workspace import TextDocument, Workspace

from pltkit.model.tokenizer import PLTTokenizer
from pltkit.runtime.completion import CompletionRequest

MAX_DOCUMENTS = 64
MAX_CHARS = 1 << 20  # 1 MiB of text per document
# the window around the cursor that goes into the prompt, in lines: llama.vim's defaults (n_prefix, n_suffix);
# tokenizing the whole rest of a long file cost 4.5 ms a request against 0.7 ms for 64 lines
PREFIX_LINES, SUFFIX_LINES = 256, 64


class PositionError(ValueError):
    """An unknown document or a position outside it."""


class Documents:
    def __init__(self, workspace_of, tok: PLTTokenizer, max_documents: int = MAX_DOCUMENTS,
                 max_chars: int = MAX_CHARS):
        self._workspace = workspace_of  # () -> the server's Workspace (made at initialize)
        self.tok, self.max_documents, self.max_chars = tok, max_documents, max_chars
        self.recent: OrderedDict[str, None] = OrderedDict()  # uris, least recently edited first
        self.counts: dict[str, tuple[int, int]] = {}  # uri -> (version, tokens)

    @property
    def workspace(self) -> Workspace:
        return self._workspace()

    def touched(self, uri: str) -> list[str]:
        """Record an open or edit; returns the uris dropped to stay within the bounds."""
        doc = self.text(uri)
        if doc is None:
            return []
        self.recent[uri] = None
        self.recent.move_to_end(uri)
        dropped = [uri] if len(doc.source) > self.max_chars else []
        while len(self.recent) - len(dropped) > self.max_documents:
            dropped.append(next(u for u in self.recent if u not in dropped))
        for u in dropped:
            self.closed(u)
            self.workspace.remove_text_document(u)
        return dropped

    def closed(self, uri: str) -> None:
        self.recent.pop(uri, None)
        self.counts.pop(uri, None)

    def text(self, uri: str) -> TextDocument | None:
        """pygls's document for a uri as the client spells it (pygls keys them percent-decoded)."""
        return self.workspace.text_documents.get(unquote(uri))

    def get(self, uri: str) -> TextDocument:
        doc = self.text(uri) if uri in self.recent else None
        if doc is None:
            raise PositionError(f"unknown document: {uri} (not open, or dropped: see plt-lsp's bounds)")
        return doc

    def version(self, uri: str) -> int | None:
        doc = self.text(uri) if uri in self.recent else None
        return None if doc is None else doc.version

    def split(self, uri: str, line: int, character: int) -> tuple[str, str, str]:
        """(up to PREFIX_LINES lines before the cursor's line, its line up to the cursor, the rest of it
        and up to SUFFIX_LINES lines after it): llama.cpp's /infill input_prefix, prompt and input_suffix,
        as llama.vim sends them. `character` counts in the client's position encoding (UTF-16 by default)."""
        doc = self.get(uri)
        lines = doc.lines
        if line == len(lines) and character == 0 and (not lines or lines[-1].endswith(("\n", "\r"))):
            return "".join(lines[-PREFIX_LINES:]), "", ""
        if not 0 <= line < len(lines) or character < 0:
            raise PositionError(f"line {line} is outside the document ({len(lines)} lines)")
        text = lines[line].rstrip("\r\n")
        units = doc.position_codec.impl.num_units(text)
        if character > units:
            raise PositionError(f"character {character} is past the end of line {line} ({units} characters)")
        col = doc.position_codec.position_from_client_units(lines, Position(line, character)).character
        rest = "".join(lines[line + 1:line + 1 + SUFFIX_LINES])
        return "".join(lines[max(0, line - PREFIX_LINES):line]), lines[line][:col], lines[line][col:] + rest

    def extra(self, uri: str, budget: int) -> tuple[tuple[str, str], ...]:
        """The other open documents as (filename, text) chunks within `budget` tokens, the most
        recently edited ones kept; ordered most recent last (nearest the cursor's file)."""
        chunks, left = [], budget
        for other in reversed(self.recent):
            if other == uri or left <= 0:
                continue
            doc = self.text(other)
            if doc is None:
                continue
            n = self._tokens(other, doc)
            if n <= left:
                chunks.append((self.filename(other), doc.source))
                left -= n
        return tuple(reversed(chunks))

    def _tokens(self, uri: str, doc: TextDocument) -> int:
        version, n = self.counts.get(uri, (None, 0))
        if version != doc.version or version is None:
            text = doc.source[:self.max_chars]
            n = len(self.tok.encode(f"{self.filename(uri)}\n")) + len(self.tok.encode(text)) + 1
            self.counts[uri] = (doc.version, n)
        return n

    def filename(self, uri: str) -> str:
        """The document's path relative to the workspace root when under it, else its name."""
        path = unquote(urlparse(uri).path) or uri
        root = self.workspace.root_path
        if root and os.path.commonpath([os.path.abspath(root), os.path.abspath(path)]) == os.path.abspath(root):
            return os.path.relpath(path, root)
        return os.path.basename(path) or path

    def request(self, uri: str, line: int, character: int, options, budget: int) -> CompletionRequest:
        prefix, prompt, suffix = self.split(uri, line, character)
        return CompletionRequest(prefix=prefix, prompt=prompt, suffix=suffix, extra=self.extra(uri, budget),
                                 filename=self.filename(uri), n_predict=options.n_predict,
                                 temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                                 samplers=options.samplers, single_line=options.single_line)
