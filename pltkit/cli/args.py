"""What the command-line tools share: argparse types, so that a bad value is reported by argparse
itself (`plt-x: error: argument --threads: ...`, exit code 2) before anything heavy is imported; a
help formatter that shows defaults; and the wrapper that turns an expected user error into one line.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

from pltkit.model.config import ConfigError
from pltkit.model.paths import CheckpointError
from pltkit.runtime.artifact import ArtifactError
from pltkit.serve.listen import ListenError

# what a user can cause: a bad model folder or artifact, a port in use, a file that cannot be read or written
USER_ERRORS = (CheckpointError, ConfigError, ArtifactError, ListenError, OSError)


def _checked(convert, ok, want: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {want}, not {text!r}")
        return value
    return parse


def integer(lo: int, hi: int | None = None):
    """An argparse type: an integer from lo to hi (no upper bound when hi is None)."""
    want = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    return _checked(int, lambda v: v >= lo and (hi is None or v <= hi), want)


positive_int = integer(1)
nonneg_int = integer(0)
port = integer(1, 65535)
max_tokens = _checked(int, lambda v: v >= 1 or v == -1, "a positive integer or -1 (no limit)")
nonneg_float = _checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
positive_float = _checked(float, lambda v: 0 < v < math.inf, "a number > 0")
fraction = _checked(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
probability = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
nonempty = _checked(str, bool, "a non-empty string")


def window_count(text: str) -> int | None:
    """A positive number of evaluation windows, or 'all' (None)."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'all', not {text!r}")
    return int(text)


def _path(is_kind, kind: str):
    def parse(text: str) -> Path:
        path = Path(text)
        if not is_kind(path):
            raise argparse.ArgumentTypeError(f"{text}: {'not a ' + kind if path.exists() else 'does not exist'}")
        return path
    return parse


existing_file = _path(Path.is_file, "file")
existing_dir = _path(Path.is_dir, "folder")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends each option's default to its help, unless
    it has none (None, a flag's False) or the help already says it."""

    def _get_help_string(self, action):
        help, default = action.help or "", action.default
        if default is None or default is False or default is argparse.SUPPRESS or default == []:
            return help
        if "(default" in help or help.startswith("default"):
            return help
        if not action.option_strings and action.nargs != "?":
            return help
        shown = " ".join(map(str, default)).replace("%", "%%") if isinstance(default, list) else "%(default)s"
        return f"{help} (default: {shown})".lstrip()


def one_line_errors(prog: str, *errors: type[BaseException]):
    """Decorates a main(argv) -> int: an expected user error (USER_ERRORS, and `errors`) is printed
    as `prog: message` on one line of stderr and returns exit code 2 instead of a traceback."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            try:
                return main(argv)
            except USER_ERRORS + errors as e:
                print(f"{prog}: {message(e)}", file=sys.stderr)
                return 2
        return run
    return wrap


def message(e: BaseException) -> str:
    """An exception as one line; an OSError as `file: reason`, without the errno."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename is not None else e.strerror
    else:
        text = str(e)
    return " ".join(text.split())
