"""Helpers several test modules share (tests/ is on sys.path under pytest's default import mode)."""
import importlib.util
from pathlib import Path

from minidiff import cli

ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv, capsys):
    """``minidiff ARGV`` in-process: its exit code and what it wrote to stderr."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_error_line(code, err) -> str:
    """The single ``minidiff: error: …`` line of a user mistake (exit 2, no traceback)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minidiff: error: "), err
    return lines[0]


def load_script(folder: str, name: str):
    """Import ROOT/FOLDER/NAME.py (a benchmark or a tool, which are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
