"""Writing files so that a crash, a full disk or a kill leaves either the old or the new file.

Every file minidiff writes — checkpoints, model files, the MNIST cache, run logs and configs,
the study's JSON/CSV/markdown, sample grids, figures, the report — goes through
``atomic_write_bytes``: the bytes go to a temporary file named for this process
(``NAME.PID.tmp``, so the ranks of a torchrun job never write into each other's), are fsynced,
and replace the target in one rename.

A directory that one command writes as a whole (a training run, a study) is held by one process
at a time with ``lock_directory``.
"""
from __future__ import annotations

import fcntl
import io
import os
import re
from pathlib import Path
from typing import IO

_TMP = re.compile(r"^.+\.(\d+)\.tmp$")  # NAME.PID.tmp
LOCK_NAME = ".minidiff.lock"  # in a locked directory; holds the PID of the process that locked it


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the ``NAME.PID.tmp`` files in ``folder`` whose writer no longer runs (a process
    killed mid-write leaves one); a live process's file, e.g. another torchrun rank's, stays."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for p in entries:
        m = _TMP.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)


class DirectoryLocked(RuntimeError):
    """Another process holds the lock of a directory this one is to write."""


def lock_directory(folder: Path | str) -> IO[str]:
    """Lock ``folder`` for this process, so that a second minidiff process cannot write into it
    at the same time; returns the open lock file (``with lock_directory(d): …``).

    The lock is an OS file lock (``flock``) on ``folder/.minidiff.lock``, into which the holder
    writes its PID. The OS releases it when the file is closed or the process ends, however it
    ends (SIGKILL included), so a killed run never leaves its directory locked; the file itself
    stays (removing it would let two processes lock two different files). Raises
    DirectoryLocked naming the holder's PID."""
    f = open(Path(folder) / LOCK_NAME, "a+")  # "a+": opening never truncates the holder's PID
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip()
        f.close()
        holder = f"PID {pid}" if pid.isdigit() else "a process that is starting"
        raise DirectoryLocked(f"{folder} is in use by another minidiff process ({holder}); wait for it "
                              "to end or stop it") from None
    except BaseException:
        f.close()
        raise
    return f


def cache_dir(name: str) -> Path:
    """Where minidiff caches ``name`` (data sets, the trained classifier):
    ``$MINIDIFF_CACHE/NAME``, else ``~/.cache/minidiff/NAME``."""
    root = os.environ.get("MINIDIFF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "minidiff") / name


def atomic_write_bytes(path: Path, data: bytes, keep_previous: bool = False) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.

    The temporary file's name is unique to this process (``NAME.PID.tmp``), so two processes
    writing the same path (the ranks of a torchrun job) never write into each other's file;
    temporaries that killed writers left in the folder are removed after each write."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, path.with_name(path.name + ".prev"))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # write() and fsync() report ENOSPC without a name
            e.filename = str(path)
        raise
    _fsync_dir(path.parent)
    remove_stale_temporaries(path.parent)


def write_text(path: Path | str, text: str) -> Path:
    """``atomic_write_bytes`` for UTF-8 text; returns the path."""
    atomic_write_bytes(Path(path), text.encode("utf-8"))
    return Path(path)


def save_figure(fig, path: Path | str, dpi: int = 100) -> Path:
    """Render a matplotlib figure to PNG in memory and write it atomically; returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
