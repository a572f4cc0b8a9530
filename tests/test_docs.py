"""Docs that cannot rot: every ```python block in README.md and docs/*.md runs (blocks of one
file share a namespace, top to bottom); every `minidiff …` line (also under torchrun) in a ```bash block must parse
with the real argument parser (running them would train models for minutes)."""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def _blocks(path, lang):
    return [body for kind, body in BLOCK.findall(path.read_text()) if kind == lang]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_snippets_run(path):
    namespace = {"__name__": "__docs__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for body in _blocks(path, "python"):
            exec(compile(body, str(path), "exec"), namespace)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_minidiff_commands_parse(path):
    from minidiff.cli import _parser
    parser = _parser()
    for body in _blocks(path, "bash"):
        for line in body.splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.match(r"^(?:\.venv/bin/)?(?:torchrun\s.*?-m\s+)?minidiff\s+(.*)$", line)
            if m and m.group(1) not in ("--help",):
                parser.parse_args(shlex.split(m.group(1)))


def test_tour_links_point_at_real_files():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#]+)\)", path.read_text()):
            if target.startswith("http") or target.startswith("figures/"):
                continue
            assert (path.parent / target).exists(), f"{path.name}: broken link {target}"
