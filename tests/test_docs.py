"""Docs that cannot rot: every ```python block in docs/*.md runs and prints exactly the ```text block
beneath it (nothing, when there is none; blocks of one file share a
namespace, top to bottom, in a temporary directory; the README's example is run and checked by
tests/test_readme.py); every `minidiff …` line (also under torchrun) in a ```bash block of the
README and docs/*.md must parse with the real argument parser (running them would train models
for minutes) and use the command's one name; every relative link points at a file that exists,
and at a heading of it when it names one."""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [README, *PAGES]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
COMMAND = re.compile(r"^(?:\.venv/bin/)?(?:torchrun\s.*?-m\s+)?minidiff\s+(.*)$")


def _blocks(path, lang):
    return [body for kind, body in BLOCK.findall(path.read_text()) if kind == lang]


def _commands(path):
    for body in _blocks(path, "bash"):
        for line in body.splitlines():
            m = COMMAND.match(line.split("#", 1)[0].strip())
            if m:
                yield m.group(1)


def _slug(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's rule) gives a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = BLOCK.sub("", path.read_text())  # a '#' line inside a code block is no heading
    return {_slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


# a ```python block and the ```text block right after it: what the snippet prints
SNIPPET = re.compile(r"```python\n(.*?)```\n(?:```text\n(.*?)```\n)?", re.S)


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_python_snippets_run_and_print_what_the_page_shows(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes stays out of the working tree
    namespace = {"__name__": "__docs__"}
    for body, shown in SNIPPET.findall(path.read_text()):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(body, str(path), "exec"), namespace)
        first = body.splitlines()[0]
        assert out.getvalue() == shown, f"{path.name}: the snippet beginning {first!r} printed\n{out.getvalue()}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_minidiff_commands_parse(path):
    from minidiff.cli import _parser
    parser = _parser()
    for args in _commands(path):
        if args not in ("--help",):
            parser.parse_args(shlex.split(args))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_commands_use_the_one_name_of_each_command(path):
    # `study` is a deprecated alias of `run`: the docs teach the name that is listed
    assert [a for a in _commands(path) if a.split()[0] == "study"] == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_point_at_real_files_and_headings(path):
    text = BLOCK.sub("", path.read_text())
    targets = [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)]  # http(s), mailto…
    for target in targets:
        file, _, anchor = target.partition("#")
        dest = (path.parent / file) if file else path
        assert dest.exists(), f"{path.name}: broken link {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{path.name}: {target}: no heading #{anchor} in {dest.name}"


def test_every_test_the_reliability_page_names_exists():
    """docs/reliability.md proves each promise by naming tests: each must be defined where it says."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", text)
    assert len(named) >= 30
    for path, name in named:
        source = (ROOT / path).read_text()
        assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{path}::{name} is not defined"
