"""Writing outputs so that nothing is ever half-written: to a temporary sibling, renamed into place when complete.
A destination that exists is replaced only when it is ctfgen's own earlier output (or empty), never a user's file.
A write the system refuses (a full disk, a read-only place, a folder removed meanwhile) ends as one line naming
the output (`WriteRefused`), with its temporary files gone."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ctfgen.errors import CtfgenError
from ctfgen.validation import check_destination

REASONS = {
    errno.ENOSPC: "no space is left on its device; free some space or choose another path",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another path",
    errno.EROFS: "its file system is read-only; choose another path",
    errno.EACCES: "permission denied; choose a path you may write to",
    errno.EPERM: "permission denied; choose a path you may write to",
    errno.ENOENT: "its folder was removed while it was written; check the path and run again",
}


class WriteRefused(CtfgenError):
    """The system refused to write an output; `errno` and `strerror` say why, as an OSError's do."""

    def __init__(self, path, error: OSError | WriteRefused):
        self.errno, self.strerror = error.errno, error.strerror
        super().__init__(f"cannot write {path}: {REASONS.get(self.errno) or self.strerror or error}")


@contextmanager
def held_alone(folder: Path, what: str):
    """Hold an advisory lock on `folder` (created if missing) while the block runs; while another process holds it,
    refuse with one line naming `what`. The lock is on the folder itself, so it leaves no file behind, and the system
    drops it when its process ends, even by SIGKILL, so a killed run never leaves its folder locked."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CtfgenError(f"{what} is in use by another ctfgen process running now; wait for it to finish (or "
                              f"stop it) and run again") from None
        yield
    finally:
        os.close(fd)


@contextmanager
def writing(path):
    """Turn the system's refusal to write `path`, or anything in it, into one line that names `path`."""
    try:
        yield
    except (OSError, WriteRefused) as e:
        raise WriteRefused(path, e) from None


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors' save_file, its I/O failures raised as the OSError they are (it raises its own error type with
    the errno in the text)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def append_line(path, line: str) -> None:
    """Add `line` to a log, whole or not at all: a write cut short (a full disk) is cut off again."""
    data = memoryview((line + "\n").encode())
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def reserve_space(path) -> None:
    """Allocate every block of a file that is then written through a memory map: a full disk fails here, as an
    OSError, not later as a crash (SIGBUS) in the middle of a write. A file system that cannot allocate ahead is
    left as it is."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path, directory: bool) -> None:
    """tempfile (and safetensors' own temporary file) create private files (0600/0700); give finished outputs,
    and the files of a finished directory, the usual permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())
    if directory:
        for file in Path(path).iterdir():
            _publish_mode(file, directory=file.is_dir())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE), so that a process killed at
    any moment leaves one of them complete at `b`; False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM):  # not supported by this kernel or filesystem
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, final: Path, is_ours) -> None:
    """Move a fully written directory `tmp` to `final`, replacing what was there only when that is empty or
    `is_ours(final)` (ctfgen's own earlier output): never a user's directory, a symlink or a device."""
    check_destination(final, directory=True)
    if not final.exists():
        tmp.rename(final)
        return
    if any(final.iterdir()) and not is_ours(final):
        raise CtfgenError(f"{final} exists and was not written by ctfgen; it is left as it is: choose another path")
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old contents
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
    final.rename(old)  # over the empty directory just made
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path) and rename the result to `path` only once it is complete; `path` must be new or a
    regular file (renaming over a symlink or a device would replace it, not write through it)."""
    path = Path(path)
    check_destination(path, directory=False)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            _publish_mode(tmp, directory=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_dir_atomic(directory, write, is_ours) -> Path:
    """Call write(tmp_dir) and put the complete directory at `directory` (see replace_dir: in place of an empty
    one or of what `is_ours`), so that a run killed half-way leaves nothing half-written there."""
    directory = Path(directory)
    with writing(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            write(tmp)
            _publish_mode(tmp, directory=True)
            replace_dir(tmp, directory, is_ours)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return directory
