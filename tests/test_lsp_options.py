"""plt-lsp's settings (pltkit/lsp/options.py): what a client's value becomes, what is refused, and
that every setting reaches the CompletionRequest the engine runs (pltkit/lsp/documents.py)."""

from dataclasses import fields

import pytest
from lsprotocol.types import TextDocumentItem
from pygls.workspace import Workspace

import pltkit
from pltkit.lsp.documents import Documents
from pltkit.lsp.options import Options, merged, section
from pltkit.runtime.completion import CompletionRequest
from pltkit.runtime.sampling import DEFAULT_SAMPLERS

SAMPLING = ("n_predict", "temperature", "top_k", "top_p", "samplers", "single_line")


def test_the_defaults_are_the_engines():
    """No setting: the request is CompletionRequest's default one (greedy, as before the sampling settings)."""
    for name in SAMPLING:
        assert getattr(Options(), name) == getattr(CompletionRequest(), name), name
    assert Options().samplers == DEFAULT_SAMPLERS and Options().temperature == 0


def test_valid_settings_are_taken():
    llama_vim = {"samplers": ["top_k", "top_p", "infill"], "top_k": 40, "top_p": 0.90}
    o = merged(Options(), section({"pltkit": llama_vim}))
    assert (o.samplers, o.top_k, o.top_p) == (("top_k", "top_p", "infill"), 40, 0.9)
    o = merged(o, {"samplers": ["top-k", "temp"], "top_p": 1, "top_k": 0, "temperature": 1, "n_predict": 4096})
    assert o == Options(samplers=("top_k", "temperature"), top_p=1.0, top_k=0, temperature=1.0, n_predict=4096)
    assert isinstance(o.top_p, float) and isinstance(o.temperature, float)
    assert merged(o, {"samplers": []}).samplers == ()  # llama.vim's warm-up: the full softmax


@pytest.mark.parametrize("name, value", [
    ("samplers", ["top_k", "bogus"]), ("samplers", "top_k"), ("samplers", [1]), ("samplers", [["top_k"]]),
    ("samplers", {"top_k": 1}), ("top_k", -1), ("top_k", 1.5), ("top_k", True), ("top_p", 0), ("top_p", 1.5),
    ("top_p", float("nan")), ("top_p", "0.9"), ("temperature", -0.1), ("n_predict", 0), ("n_predict", 4097),
    ("single_line", 1), ("context_tokens", -1),
])
def test_invalid_settings_keep_the_previous_value(name, value):
    before = Options(samplers=("top_k", "temperature"), top_k=3, top_p=0.5, temperature=0.7, n_predict=9,
                     single_line=True, context_tokens=7)
    assert merged(before, {name: value}) == before


def test_every_setting_reaches_the_request():
    ws = Workspace("file:///project")
    ws.put_text_document(TextDocumentItem("file:///project/main.py", "python", 1, "x = 1\ny"))
    docs = Documents(lambda: ws, pltkit.load_tokenizer("default"))
    docs.touched("file:///project/main.py")
    options = Options(n_predict=7, temperature=0.5, top_k=3, top_p=0.25, samplers=("top_p", "infill"),
                      single_line=True)
    req = docs.request("file:///project/main.py", 1, 1, options, 0)
    assert {name: getattr(req, name) for name in SAMPLING} == {name: getattr(options, name) for name in SAMPLING}
    assert set(SAMPLING) == {f.name for f in fields(Options)} - {"context_tokens"}  # a new setting is listed here
    assert (req.prefix, req.prompt, req.suffix) == ("x = 1\n", "y", "")

