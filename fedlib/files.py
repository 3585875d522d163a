"""Writing output files whole or not at all, and refusing outputs that cannot be written.

Every file fedlib writes (a run's history, a checkpoint, a figure, a reproduction result)
goes through :func:`atomic_write_bytes`: the bytes go to a temporary file in the same
folder, which is flushed to disk and then renamed over the target, so a reader, a crash
or a kill never sees half a file. :func:`check_output` is called before a long run starts,
so that a path that cannot be written is refused at once instead of after the training.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from fedlib.params import InputError


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def resolve_target(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` replaces: symbolic links are followed (the link stays
    and the file it points to is replaced). Raise InputError if that exists and is not a
    regular file (a directory, /dev/null, a pipe)."""
    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return target
    except OSError as error:
        raise InputError(f"cannot write {path}: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"cannot write {path}: it exists and is {_kind(mode)}; name a file instead")
    return target


def _temp_name(target: Path) -> Path:
    """A temporary file beside ``target``, named after it and after this process."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temps(target: Path) -> None:
    """Delete temporary files of ``target`` left by writers that were killed (their process is gone)."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(\d+)\.[0-9a-f]+\.tmp$")
    try:
        candidates = list(target.parent.iterdir())
    except OSError:
        return
    for path in candidates:
        match = pattern.match(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # exists, owned by someone else
        return True
    return True


def check_output(path: str | os.PathLike) -> Path:
    """Make sure the file ``path`` can be written later: refuse it now if not (InputError).

    Returns the file a write will replace (links followed). See :func:`check_folder`.
    """
    target = resolve_target(path)
    check_folder(target.parent, what=str(path))
    return target


def check_folder(folder: str | os.PathLike, what: str | None = None) -> Path:
    """Make sure files can be written in ``folder``: refuse it now if not (InputError).

    Missing folders are created; a test file is created and removed there, which catches
    read-only folders and file systems such as /proc.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder / ".probe")
        probe = _temp_name(folder / ".probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as error:
        raise InputError(f"cannot write {what or folder}: {error.strerror} ({error.filename or folder})") from None
    return folder


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all.

    A temporary file in the same folder is written, flushed to disk and renamed over the
    target; the folder is flushed too, so the rename survives a power cut. The new file
    gets the mode of the file it replaces (or the usual mode under the umask). Temporary
    files left by killed writers of the same target are removed. A target that exists and
    is not a regular file is refused (InputError); symbolic links are written through.
    """
    target = resolve_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else None
    tmp = _temp_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # 0o666 less the umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for text (UTF-8)."""
    atomic_write_bytes(path, text.encode())
