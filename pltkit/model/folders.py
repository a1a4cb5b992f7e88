"""Writing a folder so that a kill at any moment leaves either the old folder or none: the new
one is built in `.NAME.partial-PID` beside it (staged_folder) and renamed into place; an existing
one is renamed aside (`.NAME.old-PID`) just before and removed just after. The next writer removes
what killed writers left (also `.NAME.PID.XXXX.partial`, as earlier versions named the temporary
folder of an import) and puts back an old folder left aside. Single files are written under a
temporary name and renamed (write_file)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def kill_point(stage: str) -> None:
    """Fault injection for tests/test_kills.py: with PLTKIT_KILL_AT=<stage> in the environment the
    process SIGKILLs itself there, as `kill -9` or the OOM killer would."""
    if os.environ.get("PLTKIT_KILL_AT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def repair_leftovers(out: Path) -> None:
    """Clean up after writers of `out` that were killed, i.e. whose PID is no longer running: remove
    their temporary folders (`.NAME.partial-PID`; `.NAME.PID.XXXX.partial` of earlier versions' imports), and put
    back the old folder `.NAME.old-PID` that a replacement had renamed aside if `out` is missing (else
    remove it). Folders of running processes are left alone; one whose PID was reused by another
    process stays until that process ends."""
    if not out.parent.is_dir():
        return
    leftover = re.compile(rf"\.{re.escape(out.name)}\.(?:partial-(\d+)|(\d+)\.\w+\.partial|old-(\d+))")
    for path in sorted(out.parent.iterdir()):
        m = leftover.fullmatch(path.name)
        if not m or _alive(int(m[1] or m[2] or m[3])):
            continue
        try:
            if m[3] and not os.path.lexists(out):
                log.warning("%s: putting back the previous version, left aside by an interrupted replacement", out)
                os.rename(path, out)
            else:
                log.warning("removing %s, left by an interrupted run", path)
                _remove(path)
        except OSError as e:  # another user's, or removed meanwhile by another run
            log.warning("leaving %s: %s", path, e.strerror)


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename the complete folder `tmp` to `out`. An existing `out` is renamed aside first and removed
    once the new one is in place: a kill in between leaves `out` missing and the old one aside, which
    the next run puts back (repair_leftovers). So `out` is never an incomplete folder."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if os.path.lexists(out):
        _remove(old)
        os.rename(out, old)
    kill_point("between-renames")
    try:
        os.replace(tmp, out)
    except BaseException:
        if os.path.lexists(old) and not os.path.lexists(out):
            os.rename(old, out)
        raise
    kill_point("after-rename")
    _remove(old)


def umask_mode(mode: int) -> int:
    """`mode` less the process's umask: what open() and mkdir() give by default."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextmanager
def staged_folder(out: Path, check: Callable[[Path], None] = lambda out: None) -> Iterator[Path]:
    """A new, empty temporary folder beside `out` (`.NAME.partial-PID`) for the block to fill; when the block
    ends without an error, its files get the usual permissions (some writers make them private to the owner)
    and it replaces `out` (replace_folder). On any error or interrupt it is removed and `out` is left as it
    was. First the leftovers of killed writers are cleaned up (repair_leftovers), then check(out) may refuse."""
    repair_leftovers(out)
    check(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for entry in tmp.rglob("*"):
            os.chmod(entry, umask_mode(0o777 if entry.is_dir() else 0o666))
        kill_point("before-rename")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_file(path: Path, writer: Callable[[str], object]) -> None:
    """writer(name) writes the file `path` under a temporary name, renamed to `path` once complete (with the
    usual permissions), so an interrupted write leaves no partial file."""
    tmp = path.with_name(path.name + ".partial")
    try:
        writer(str(tmp))
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
