"""Writing output files whole or not at all, refusing outputs that cannot be written, and
reading JSON that a user can hand us.

Every file fedlib writes (a run's history, a checkpoint, a figure, a reproduction result)
goes through :func:`atomic_write_bytes`: the bytes go to a temporary file in the same
folder, which is flushed to disk and then renamed over the target, so a reader, a crash
or a kill never sees half a file. :func:`check_output` is called before a long run starts,
so that a path that cannot be written is refused at once instead of after the training: it
creates and removes the very temporary name a write will use (a name that fits the file
system but whose temporary name does not is refused too). A write that fails all the same
(the disk is full) raises :class:`WriteError`, which names the file; the old file is kept.

:func:`load_json` reads a JSON file with a depth limit (``json.loads`` recurses, and a file
nested 100,000 deep would exhaust Python's stack); :func:`to_json` writes strict JSON (no bare
NaN or Infinity, which strict readers refuse).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from pathlib import Path

import numpy as np

from fedlib.params import InputError

# The deepest nesting any file fedlib reads has is 4 (a result's history's records' clients);
# a JSON file nested deeper than this is refused before it is parsed.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


class WriteError(OSError):
    """An output file could not be written (the disk is full, the folder went away); the old
    file, if any, is kept. ``str()`` names the file and the reason."""

    def __str__(self) -> str:
        return str(self.strerror)


def json_depth(text: str) -> int:
    """How deep the arrays and objects of the JSON ``text`` nest (0 for a bare value), counted
    without parsing it: brackets inside strings do not count."""
    codes = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "replace"), dtype=np.uint8)
    if not len(codes):
        return 0
    step = np.isin(codes, (ord("["), ord("{"))).astype(np.int32) - np.isin(codes, (ord("]"), ord("}")))
    return int(max(np.cumsum(step).max(), 0))


def load_json(path: str | os.PathLike) -> object:
    """The JSON value in the file ``path``. FileNotFoundError if there is none; InputError with
    the reason alone (the caller names the file) if it cannot be read, is not JSON or nests deeper
    than MAX_JSON_DEPTH. NaN and Infinity, which older fedlib files hold for a diverged run's
    loss, are read as floats."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(str(error)) from None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise InputError(f"its JSON nests {depth} deep; fedlib's files nest at most {MAX_JSON_DEPTH}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(str(error)) from None
    except RecursionError:
        raise InputError("its JSON nests too deep to read") from None


def to_json(value: object) -> str:
    """``value`` as strict JSON (indent 1): ValueError for NaN or infinity, which JSON has no
    words for (fedlib writes null and says why in a field of its own)."""
    return json.dumps(value, indent=1, allow_nan=False)


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
    if "\0" in os.fspath(path):
        raise InputError(f"cannot write {path!r}: a file name cannot hold the character NUL")
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


def check_output(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (),
                 what: str = "the output") -> Path:
    """Make sure the file ``path`` can be written later: refuse it now if not (InputError).

    Refused: an empty name; something that is not a regular file; one of the ``inputs`` (the
    files the command reads: writing over them would destroy them); a folder that cannot be
    created or written; a name whose temporary file (see :func:`atomic_write_bytes`) the file
    system does not take (names of 234 to 255 characters). The temporary name itself is created
    and removed here. Returns the file a write will replace (links followed).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    if not os.fspath(path):
        raise InputError(f"{what} must name a file, got an empty name")
    target = resolve_target(path)
    for source in inputs:
        if os.path.realpath(source) == str(target):
            raise InputError(f"{what} {path} is also an input ({source}); writing it would destroy it: "
                             "name another file")
    check_folder(target.parent, what=str(path))
    probe = _temp_name(target)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            limit = _name_max(target.parent)
            raise InputError(f"cannot write {path}: its name is {len(os.fsencode(target.name))} bytes long, and the "
                             f"temporary file it is written through ({len(os.fsencode(probe.name))} bytes) must fit "
                             f"the file system's {limit}; shorten the name by "
                             f"{len(os.fsencode(probe.name)) - limit} characters or more") from None
        raise InputError(f"cannot write {path}: {error.strerror}") from None
    return target


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


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
    target; the folder is flushed too, so the rename survives a power cut. A write that fails
    (a full disk) raises :class:`WriteError` and leaves the old file as it was. The new file
    gets the mode of the file it replaces (or the usual mode under the umask). Temporary
    files left by killed writers of the same target are removed. A target that exists and
    is not a regular file is refused (InputError); symbolic links are written through.
    """
    target = resolve_target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else None
        tmp = _temp_name(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # 0o666 less the umask
    except OSError as error:
        raise WriteError(error.errno, f"cannot write {path}: {error.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise WriteError(error.errno, f"cannot write {path}: {error.strerror or error}") from None
        raise
    _fsync_folder(target.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for text (UTF-8)."""
    atomic_write_bytes(path, text.encode())
