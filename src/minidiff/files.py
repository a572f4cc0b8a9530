"""Writing files so that a crash, a full disk or a kill leaves either the old or the new file.

Every file minidiff writes — checkpoints, model files, the MNIST cache, run logs and configs,
the study's JSON/CSV/markdown, sample grids, figures, the report — goes through
``atomic_write_bytes``: the bytes go to a temporary file named for this process
(``NAME.PID.tmp``, so the ranks of a torchrun job never write into each other's), are fsynced,
and replace the target in one rename.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

_TMP = re.compile(r"^.+\.(\d+)\.tmp$")  # NAME.PID.tmp


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
