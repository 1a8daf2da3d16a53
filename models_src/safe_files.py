"""A checkpoint folder's files, read as untrusted input.

Whoever can put a folder into the checkpoint directory chooses what stands behind each
name: a link to ``/proc/self/environ``, a FIFO that blocks whoever opens it, ``/dev/zero``.
Every reader of a checkpoint folder goes through ``open_file``, which opens only a
regular file inside the folder:

- never through a symbolic link, at any step (``O_NOFOLLOW`` on the folder and on each
  name under it), so a name swapped for a link after a check is refused as well;
- never a FIFO, device or socket: ``lstat`` refuses one before it is opened, and a name
  swapped for one after that is opened without blocking (``O_NONBLOCK``) and refused
  by ``fstat``;
- never one over the cap for its kind, read from ``fstat`` before a byte is read.

Folder listings (``entries``) never follow links either.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

#: config.json, a weights index, health.json, a tokenizer config, a safetensors header.
MAX_JSON_BYTES = 4 * 1024 * 1024
#: tokenizer.json, vocab.json, merges.txt: a 250,000-token vocabulary takes about 20 MB.
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
#: A model card is a few kB; a bigger one is not rendered (it can still be downloaded).
MAX_CARD_BYTES = 512 * 1024
#: model.pt / pytorch_model.bin (no header declares their size): a small model's state
#: dict, optimizer state included.
MAX_LEGACY_WEIGHTS_BYTES = 4 * 1024 * 1024 * 1024
#: Files and folders a listing walks through before it gives up on a folder.
MAX_ENTRIES = 10_000

_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a folder"))


class UnsafeFile(ValueError):
    """A file that is not read: not a regular file inside its folder, or over its cap.
    The message names the file (``<folder>/<name>``) and says why."""


def describe(mode: int) -> str:
    """What kind of file a mode is ("a symbolic link", "a FIFO", ...)."""
    return next((kind for test, kind in _KINDS if test(mode)), "a regular file")


def not_regular(path: Path, mode: int) -> UnsafeFile:
    """The refusal of ``path``, which is not a regular file (``mode``: its lstat's)."""
    return UnsafeFile(f"{path}: {describe(mode)}, refused (a checkpoint holds only regular "
                      f"files, inside its folder)")


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def _parts(name: str) -> list[str]:
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafeFile(f"{name}: not a plain name inside the folder")
    return parts


def _refusal(path: Path, error: OSError) -> UnsafeFile | OSError:
    """What to raise when opening ``path`` without following links failed with ``error``:
    O_NOFOLLOW on a link fails with ELOOP (ENOTDIR where a folder was expected)."""
    if error.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return error
        if not stat.S_ISREG(mode):
            return not_regular(path, mode)
    return error


def _open_folder(directory: Path, parts: list[str]) -> int:
    """A descriptor of ``directory`` (then of each folder in ``parts``), no link followed."""
    try:
        fd = os.open(directory, _FOLDER_FLAGS)
    except OSError as e:
        raise _refusal(directory, e) from None
    for i, part in enumerate(parts):
        try:
            inner = os.open(part, _FOLDER_FLAGS, dir_fd=fd)
        except OSError as e:
            raise _refusal(directory.joinpath(*parts[:i + 1]), e) from None
        finally:
            os.close(fd)
        fd = inner
    return fd


def open_file(directory: str | Path, name: str, cap: int | None) -> BinaryIO:
    """``directory/name`` opened for reading (binary), if it is a regular file of at most
    ``cap`` bytes reached without a link; else UnsafeFile. ``name`` may hold ``/`` (a file
    in a subfolder). A missing file raises FileNotFoundError, as ``open`` does."""
    directory = Path(directory)
    parts, path = _parts(name), directory / name
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):  # never open a device or FIFO, even without blocking
        raise not_regular(path, mode)
    folder = _open_folder(directory, parts[:-1])
    try:
        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=folder)
    except OSError as e:
        raise _refusal(path, e) from None
    finally:
        os.close(folder)
    try:
        status = os.fstat(fd)  # what was opened, whatever the name points to by now
        if not stat.S_ISREG(status.st_mode):
            raise not_regular(path, status.st_mode)
        if cap is not None and status.st_size > cap:
            raise UnsafeFile(f"{path}: {status.st_size:,} bytes, over the limit of "
                             f"{size_text(cap)} for this file, refused")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(directory: str | Path, name: str, cap: int) -> bytes:
    with open_file(directory, name, cap) as f:
        return f.read(cap + 1)[:cap]  # a file that grew since fstat is cut at its cap


def read_text(directory: str | Path, name: str, cap: int) -> str:
    """The file as UTF-8 text (UnicodeDecodeError when it is not)."""
    return read_bytes(directory, name, cap).decode("utf-8")


def read_json(directory: str | Path, name: str, cap: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON file; ValueError (json.JSONDecodeError, UnicodeDecodeError) when it
    is not JSON."""
    return json.loads(read_bytes(directory, name, cap))


def present(directory: str | Path, name: str) -> bool:
    """Whether anything at all (a dangling link too) has that name."""
    try:
        os.lstat(Path(directory) / name)
    except OSError:
        return False
    return True


def fd_path(handle: BinaryIO) -> str:
    """A path that names the open file itself (not whatever is at its name by now), for
    libraries that open files by path (safetensors)."""
    return f"/dev/fd/{handle.fileno()}"


def entries(directory: str | Path, *, recursive: bool = True) -> list[tuple[str, os.stat_result]]:
    """Every file, folder, link and special file under ``directory`` (relative name with
    ``/``, its ``lstat``), sorted; folders are entered without following a link (a linked
    folder is listed, not entered). UnsafeFile when ``directory`` is itself a link or
    holds more than MAX_ENTRIES."""
    directory = Path(directory)
    try:
        root = os.open(directory, _FOLDER_FLAGS)
    except OSError as e:
        raise _refusal(directory, e) from None
    found: list[tuple[str, os.stat_result]] = []
    pending = [("", root)]
    try:
        while pending:
            prefix, fd = pending.pop()
            try:
                with os.scandir(fd) as listing:
                    for entry in listing:
                        name, status = prefix + entry.name, entry.stat(follow_symlinks=False)
                        found.append((name, status))
                        if len(found) > MAX_ENTRIES:
                            raise UnsafeFile(f"{directory}: holds more than {MAX_ENTRIES:,} "
                                             f"files, refused")
                        if recursive and stat.S_ISDIR(status.st_mode):
                            try:
                                pending.append((name + "/", os.open(entry.name, _FOLDER_FLAGS,
                                                                    dir_fd=fd)))
                            except OSError:  # swapped for a link, or unreadable: listed only
                                pass
            finally:
                os.close(fd)
    finally:
        for _, fd in pending:
            os.close(fd)
    return sorted(found, key=lambda item: item[0])


def regular_files(directory: str | Path, *, recursive: bool = True) -> dict[str, os.stat_result]:
    """The regular files among ``entries`` (links, FIFOs, devices and folders left out)."""
    return {name: status for name, status in entries(directory, recursive=recursive)
            if stat.S_ISREG(status.st_mode)}
