"""plt-lsp: code completions over the Language Server Protocol (stdio), in process on the same
engine as plt-serve. server.py: the handlers; documents.py: the bounded document store and the
FIM prompts; options.py: the client's settings; worker.py: the one thread that runs the engine."""
