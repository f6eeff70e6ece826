"""One folder per run, for real: a lock held for the whole run, and no empty folder left behind by
a run that failed before its first epoch.

`folder_lock` is the one advisory lock of the project (the preparation tool takes it on the
folders it writes too): a second process is refused at once, told which process holds the folder.
The lock file stays in the folder (removing it while another process waits on it would let two
processes hold "the" lock); it is empty of meaning once its holder exited.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

try:
    import fcntl  # POSIX advisory locks; released by the kernel when the process dies, even by SIGKILL
except ImportError:  # pragma: no cover  (Windows: no lock, one run per folder is then the user's care)
    fcntl = None

RUN_LOCK = ".run.lock"


class FolderBusy(FileExistsError):
    """Another live process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: Path, name: str, busy: str, error: type = FolderBusy,
                record_pid: bool = True) -> Iterator[None]:
    """Hold `folder/name` exclusively for the `with` block. When another process holds it, raise
    `error` with `busy` formatted with {folder} and {pid} (the holder's process id, written into
    the lock file when `record_pid`; a folder that must stay byte-for-byte unchanged by a second
    run, as prepare.py's, does without)."""
    folder = Path(folder)
    with open(folder / name, "a+") as lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0)
                pid = lock.read().strip() or "unknown"
                raise error(busy.format(folder=folder, pid=pid)) from None
        if record_pid:
            lock.seek(0)
            lock.truncate()
            lock.write(str(os.getpid()))
            lock.flush()
        yield


def has_finished_epoch(folder: Path) -> bool:
    """Whether any epoch of this run (or of a first stage inside it) was logged or checkpointed."""
    return any(folder.rglob("log.jsonl")) or any(folder.rglob("last.pth"))


@contextlib.contextmanager
def run_folder(folder: Path, *, enabled: bool = True) -> Iterator[Optional[Path]]:
    """Create `folder` if needed and lock it for the run. If the run then fails before any epoch was
    recorded, and this run created the folder, remove it again: a failed start leaves nothing.
    `enabled=False` (the non-first processes of a distributed run) does nothing."""
    if not enabled:
        yield None
        return
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(folder, RUN_LOCK, "{folder} is in use by another run (process {pid}); wait for it to "
                                           "finish, or write this run elsewhere (--ckpt_path, or OUT= for "
                                           "the scripts)"):
            yield folder
    except BaseException:
        if created and not has_finished_epoch(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise
