"""Folders written all at once: a save never leaves something that looks finished but is not.

Every output folder (adapters, merged models, the converted embedded model) is written under a
temporary name beside its target and renamed into place when complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_partials(target: str | os.PathLike) -> list[Path]:
    """Remove what killed saves to ``target`` left behind; return the removed folders.

    Only temporary folders written on this machine by a process that no longer exists are
    removed (their names carry a host tag and the writer's pid), so a save still running in
    another process, or on another machine sharing the folder (Drive), is left alone.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        prefix = f".{target.name}.{kind}-"
        for path in target.parent.glob(f"{prefix}*"):
            parts = path.name[len(prefix):].split("-")
            if len(parts) < 2 or parts[0] != _host_tag() or not parts[1].isdigit():
                continue
            if int(parts[1]) != os.getpid() and _pid_alive(int(parts[1])):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike):
    """Yield a temporary folder; on success it replaces ``target`` in one rename.

    On an exception the temporary folder is removed. On a kill (nothing can run) it stays as
    ``.name.partial-<host>-<pid>-<random>``, which never looks like ``target``, and the next
    ``atomic_folder(target)`` removes it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{_host_tag()}-{os.getpid()}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{_host_tag()}-{os.getpid()}-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
