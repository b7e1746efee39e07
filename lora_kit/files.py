"""Folders written all at once, and never over something lora_kit did not write.

Every output folder (adapters, merged models, the converted embedded model) is written under a
temporary name beside its target and renamed into place when complete. Each one holds a small
hidden file, ``.lora_kit_output.json``, listing the files lora_kit put there: a later save may
replace such a folder, and only such a folder, and only while it holds nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import LoraKitError

MARKER = ".lora_kit_output.json"
"""Written last inside every folder lora_kit produces: the files it wrote there."""


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


def _files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def _written_by_lora_kit(folder: Path) -> list[str] | None:
    """The files lora_kit recorded in ``folder``, or None when the folder is not a lora_kit output."""
    try:
        record = json.loads((folder / MARKER).read_text())
        return list(record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _absolute(path) -> Path:
    # Not resolve(): "." must keep a name, and a link must stay a link to be refused.
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_target(target: str | os.PathLike, inputs: tuple = ()) -> Path:
    """Refuse an output folder whose replacement would lose something; return its absolute path.

    Allowed: a folder that does not exist, an empty one, or a previous lora_kit output that
    holds only the files lora_kit wrote. ``inputs`` are folders the save reads from (the
    adapter being merged): the target must not hold them.
    """
    given = os.fspath(target)
    target = _absolute(target)
    if _within(Path.cwd().resolve(), target.resolve()):
        raise LoraKitError(
            f"Output folder {given!r} is the current folder or one above it ({target}); a save replaces the whole "
            "folder, with everything in it. Pass a new subfolder instead, e.g. 'outputs/adapter'."
        )
    for source in inputs:
        if _within(_absolute(source).resolve(), target.resolve()):
            raise LoraKitError(
                f"Output folder {given!r} holds {os.fspath(source)!r}, which this save reads from; writing there would "
                "replace it. Pass a folder beside it instead, e.g. 'outputs/merged'."
            )
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise LoraKitError(f"Output folder {given!r} exists and is not a folder ({target}). Pass a folder path.")
    if not target.is_dir() or not any(target.iterdir()):
        return target
    recorded = _written_by_lora_kit(target)
    if recorded is None:
        present = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir())
        raise LoraKitError(
            f"Output folder {given!r} already holds files that lora_kit did not write ({_listing(present)}); saving "
            "there would delete them. Pass a new or empty folder, e.g. 'outputs/adapter', or move those files away."
        )
    extra = [f for f in _files_in(target) if f not in recorded and f != MARKER]
    if extra:
        raise LoraKitError(
            f"Output folder {given!r} is an earlier lora_kit output, but it now also holds files lora_kit did not write "
            f"({_listing(extra)}); replacing it would delete them. Move those files away, or pass another folder."
        )
    return target


def _listing(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _leftovers(target: Path, kind: str) -> list[Path]:
    """Temporary folders of ``kind`` that killed saves to ``target`` on this machine left behind."""
    prefix = f".{target.name}.{kind}-"
    found = []
    for path in sorted(target.parent.glob(f"{prefix}*")):
        parts = path.name[len(prefix) :].split("-")
        if len(parts) < 2 or parts[0] != _host_tag() or not parts[1].isdigit():
            continue
        if int(parts[1]) != os.getpid() and _pid_alive(int(parts[1])):
            continue  # a save still running in another process
        found.append(path)
    return found


def clean_stale_partials(target: str | os.PathLike) -> list[Path]:
    """Tidy up after saves to ``target`` that were killed; return the removed folders.

    A previous output moved aside (``.name.old-...``) is put back when ``target`` is missing:
    the kill came between the two renames. Half-written folders (``.name.partial-...``) are
    removed. Only folders written on this machine by a process that no longer exists are
    touched (their names carry a host tag and the writer's pid), so a save still running in
    another process, or on another machine sharing the folder (Drive), is left alone.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for old in _leftovers(target, "old"):
        previous = old / target.name
        if previous.is_dir() and not target.exists():
            os.replace(previous, target)
            shutil.rmtree(old, ignore_errors=True)
        else:  # the new output is in place: this copy of the one before is no longer needed
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    for partial in _leftovers(target, "partial"):
        if partial.is_file():  # a file written with atomic_file
            partial.unlink(missing_ok=True)
        else:
            shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial)
    return removed


def partial_file(target: Path, suffix: str = "") -> Path:
    """A new empty file beside ``target`` named as clean_stale_partials expects (host tag and writer's pid)."""
    fd, name = tempfile.mkstemp(
        prefix=f".{target.name}.partial-{_host_tag()}-{os.getpid()}-", suffix=suffix, dir=target.parent
    )
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_file(target: Path, suffix: str = ""):
    """Yield a temporary file beside ``target``; on success it replaces ``target`` in one rename, readable by all."""
    partial = partial_file(target, suffix)
    try:
        yield partial
        os.chmod(partial, 0o666 & ~umask())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def check_disk_space(path: Path, needed: int, what: str, option: str) -> None:
    """Refuse, before any work, an output of ``needed`` bytes that the disk holding ``path`` has no room for."""
    folder = Path(path).resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed * 1.02 + 2**20 > free:
        raise LoraKitError(
            f"Not enough disk space for {what}: it needs {needed / 2**30:.2f} GiB in {folder}, and "
            f"{free / 2**30:.2f} GiB are free. Free some space or pass another {option}; nothing was written."
        )


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _readable_by_all(folder: Path) -> None:
    # mkdtemp makes 0700 folders and some writers make 0600 files; a shared cache needs the usual umask modes.
    mask = umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, inputs: tuple = ()):
    """Yield a temporary folder; on success it replaces ``target`` in one rename.

    ``target`` is checked first (``check_target``): a folder holding anything lora_kit did not
    write is refused, never deleted. On an exception the temporary folder is removed. On a kill
    (nothing can run) it stays as ``.name.partial-<host>-<pid>-<random>``, which never looks like
    ``target``, and the next ``atomic_folder(target)`` removes it. A previous output is moved
    aside only once the new one is complete, and deleted only once the new one is in place.
    """
    given, target = target, _absolute(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(target)
    check_target(given, inputs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{_host_tag()}-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        _readable_by_all(tmp)
        # Written last: a folder with this file is complete.
        (tmp / MARKER).write_text(json.dumps({"written_by": "lora_kit", "files": _files_in(tmp)}, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if target.exists():
            check_target(given, inputs)  # again: files may have been added while this save ran
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{_host_tag()}-{os.getpid()}-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old / target.name, target)  # put the previous output back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
