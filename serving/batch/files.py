"""Files of a batch-scoring run that survive a crash: atomic writes (a temp name, fsync, rename, then
fsync of the folder, so a renamed file is on disk), removal of the temp names a killed run left, and
the lock that keeps a second run off an output another run is writing. Standard library only."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any


class OutputBusy(ValueError):
    """Another run holds the output's lock."""


def temp_name(path: Path) -> Path:
    """Where `path` is written before its rename: `.<name>.<pid>.tmp` in the same folder."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (a rename, a new file or folder) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> None:
    """Rename a finished (fsynced) temp file to `path`, then fsync the folder: a crash keeps one or the other."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp name for writing; on success fsync it and rename it to `path`, on any failure remove it:
    a reader (or a resume) never sees half a file."""
    tmp = temp_name(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, lines: Iterable[str]) -> None:
    """Write lines to `path` atomically (atomic_file)."""
    with atomic_file(path) as f:
        f.writelines(line + "\n" for line in lines)


def remove_temps(folder: Path, names: Sequence[str] | None = None) -> int:
    """Remove the temp files a killed run left in `folder` (of the files `names` only, or all of them);
    call it holding the output's lock, so no live run is writing them. Returns how many went."""
    wanted = "|".join(re.escape(name) for name in names) if names is not None else ".+"
    pattern = re.compile(rf"\.(?:{wanted})\.\d+\.tmp")
    removed = 0
    for path in folder.iterdir() if folder.is_dir() else ():
        if pattern.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


class OutputLock:
    """An exclusive `flock` on `.<output>.lock` next to the output, held for the whole run: a second run
    on the same output is refused at once, naming the first. The kernel drops the lock when its process
    dies (even by kill -9), so a killed run never blocks the next one; a finished run removes the file."""

    def __init__(self, output: Path) -> None:
        self.output, self.path = output, output.with_name(f".{output.name}.lock")
        self.file: IO[str] | None = None

    def __enter__(self) -> OutputLock:
        while True:
            f = open(self.path, "a+", encoding="utf-8")  # not truncated: it may name the run holding it
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().split()
                f.close()
                who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "a process that just started"
                raise OutputBusy(f"{self.output} is being written by another run ({who}; lock file {self.path}); "
                                 "wait for it to finish, or choose another --output") from None
            try:  # the run that held it may have removed the file just before we locked it: lock the new one
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.path.unlink(missing_ok=True)  # while still locked: a run that opened it re-checks the inode
            self.file.close()
            self.file = None
