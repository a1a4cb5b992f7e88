"""plt-lsp in a real editor: headless Neovim with the Neovim 0.7 configuration of docs/lsp.md, read
from it (`vim.lsp.start_client` + `vim.lsp.buf_attach_client`, what Debian 12's nvim 0.7.2 offers;
the server started as this interpreter's `-m pltkit.cli.lsp --model default`), opens a
Python file that ends in a half-written function, asks for textDocument/completion at the end of
it, applies the first item's textEdit to the buffer and writes the file. Skipped without `nvim`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NVIM = shutil.which("nvim")
pytestmark = pytest.mark.skipif(NVIM is None, reason="nvim is not installed (apt-get install neovim)")

# The file as the user left it: the cursor at the end of the last `return ` line.
PARTIAL = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return '''
TAIL = "\n"

DOC = Path(__file__).resolve().parent.parent / "docs" / "lsp.md"


def documented_config() -> str:
    """The Lua of docs/lsp.md's "Neovim 0.7" section, which starts the server as `cmd = { "plt-lsp" }`."""
    text = DOC.read_text()
    section = text[text.index("### Neovim 0.7"):]
    lua = section[section.index("```lua\n") + len("```lua\n"):]
    lua = lua[:lua.index("```")]
    assert 'cmd = { "plt-lsp" }' in lua and "vim.lsp.start_client" in lua and "local plt_client" in lua, lua
    return lua


# What the test does in the editor, once the file is loaded; the result goes to RESULT as JSON.
DRIVER = """
local function run()
  vim.wait(60000, function()  -- until attached and initialized, or the server is gone
    if not plt_client then return false end
    local c = vim.lsp.get_client_by_id(plt_client)
    return c == nil or (c.initialized and vim.lsp.buf_is_attached(0, plt_client))
  end, 50)
  local client = plt_client and vim.lsp.get_client_by_id(plt_client)
  assert(client and client.initialized and vim.lsp.buf_is_attached(0, plt_client),
         "plt-lsp did not start and attach to the buffer (client " .. tostring(plt_client) .. ")")
  local last = vim.api.nvim_buf_line_count(0) - 1
  local text = vim.api.nvim_buf_get_lines(0, last, last + 1, true)[1]
  local params = { textDocument = { uri = vim.uri_from_bufnr(0) },
                   position = { line = last, character = #text } }
  local replies, err = vim.lsp.buf_request_sync(0, "textDocument/completion", params, 90000)
  assert(replies, "no reply to textDocument/completion: " .. tostring(err))
  local reply = replies[plt_client]
  assert(reply and not reply.err, "completion failed: " .. vim.inspect(reply))
  local items = reply.result and (reply.result.items or reply.result) or {}
  local item = items[1]
  assert(item and item.textEdit, "no completion item with a textEdit: " .. vim.inspect(reply.result))
  local edit = item.textEdit
  if edit.range == nil then  -- an InsertReplaceEdit
    edit = { range = edit.insert, newText = edit.newText }
  end
  vim.lsp.util.apply_text_edits({ edit }, 0, client.offset_encoding)
  vim.cmd("write")
  vim.fn.writefile({ vim.fn.json_encode({ item = item, line = last, character = #text }) }, RESULT)
end
vim.api.nvim_create_autocmd("VimEnter", {
  callback = function()
    local ok, msg = pcall(run)
    if ok then
      vim.cmd("qall!")
    else
      vim.fn.writefile({ vim.fn.json_encode({ error = tostring(msg) }) }, RESULT)
      vim.cmd("cquit 3")
    end
  end,
})
"""


def lua_string(s: str) -> str:
    return "[==[" + s + "]==]"


def test_nvim_completion_inserts_text(tmp_path):
    src = tmp_path / "fib.py"
    src.write_text(PARTIAL + TAIL)
    result = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "pltkit.cli.lsp", "--model", "default"]
    config = tmp_path / "init.lua"
    lua_cmd = "cmd = {" + ", ".join(map(lua_string, cmd)) + "}"
    config.write_text("local RESULT = " + lua_string(str(result)) + "\n"
                      + documented_config().replace('cmd = { "plt-lsp" }', lua_cmd) + DRIVER)
    # no user configuration, plugins or state of Neovim's; the user cache (the exported model, and
    # nvim's LSP log) stays conftest's
    env = {**os.environ, **{k: str(tmp_path / k.lower()) for k in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME")}}
    proc = subprocess.run([NVIM, "--headless", "-n", "-i", "NONE", "-u", str(config), str(src)], cwd=tmp_path,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    out = json.loads(result.read_text()) if result.exists() else {}
    assert proc.returncode == 0 and "error" not in out, (proc.returncode, out, proc.stdout[-2000:], proc.stderr[-2000:])
    item = out["item"]
    edit = item["textEdit"]
    start = edit.get("range", edit.get("insert"))["start"]
    assert start == {"line": out["line"], "character": len(PARTIAL.splitlines()[-1])}, edit
    inserted = edit["newText"]
    print(f"plt-lsp completed {PARTIAL.splitlines()[-1]!r} with {inserted!r}")
    assert inserted, item
    assert src.read_text() == PARTIAL + inserted + TAIL
