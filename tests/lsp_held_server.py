"""plt-lsp (its real main, server and engine) for tests that need the engine's one worker busy
for as long as they like: a completion in a document whose text starts with HOLD does not run
until its Cancel is set (by $/cancelRequest, a newer request or an edit of that document);
then the real engine runs it and, seeing the Cancel, answers cancelled as it always does.
Every other completion runs the engine untouched. Run as `python tests/lsp_held_server.py
--model default` (plt-lsp's arguments)."""

import sys

from pltkit.cli.lsp import main
from pltkit.runtime.engine import Engine

HOLD = "# hold"
run_all = Engine.run_all


def held_run_all(self, ids, req, slot_id=0, cancel=None, *args, **kwargs):
    if cancel is not None and (req.prefix + req.prompt).startswith(HOLD):
        cancel.wait()
    return run_all(self, ids, req, slot_id, cancel, *args, **kwargs)


if __name__ == "__main__":
    Engine.run_all = held_run_all
    sys.exit(main())
