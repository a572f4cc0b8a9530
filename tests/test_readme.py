"""The README is a landing page whose claims hold on a fresh clone: its Python example runs as
written and writes the grid it says, its Table 1 describes the models that ship, its set-up
matches the Makefile, and it stays short (measurements and internals live in docs/)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _table(header_start: str) -> list[dict[str, str]]:
    """The rows of the README's Markdown table whose header begins with ``header_start``."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    cols = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(cols, (c.strip() for c in line.strip("|").split("|")))))
    return rows


@pytest.mark.slow
def test_the_python_example_runs_as_written_and_saves_a_grid_of_64_digits(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert len(blocks) == 1, "the README has one Python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "__readme__"})
    written = list(tmp_path.iterdir())
    assert [p.name for p in written] == ["digits.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(written[0]) as im:
        # 64 digits in an 8 × 8 grid, 28 px each with 2 px of padding around: 8 · 30 + 2
        assert im.size == (242, 242) and im.mode == "L"
        assert im.getextrema()[1] > 0  # not a black image


def test_table_1_describes_the_shipped_models():
    """The parameters and images seen in Table 1 are those of the shipped files (a model fine-tuned
    from another shipped one counts both, the fine-tune's apart): when a new model ships, this
    fails until the table is re-measured."""
    from minidiff.metrics import count_params
    from minidiff.modelfile import load_model
    from minidiff.shipped import CONDITIONAL_NAMES, DIFFUSION_NAMES, available, card

    rows = {r["model"]: r for r in _table("| model | images seen |")}
    # the study's models: the conditional one draws on demand, outside the paper's study (its own
    # measurements are in docs/tour.md and docs/models.md)
    ships = [n for n in DIFFUSION_NAMES if n in available() and n not in CONDITIONAL_NAMES]
    assert set(ships) <= set(rows)
    for name in ships:
        c = card(available()[name])
        source = c.get("finetuned_from")
        seen = (f"{source['images_seen'] + c['images_seen']:,} (fine-tuning {c['images_seen']:,})" if source
                else f"{c['images_seen']:,}")
        assert rows[name]["images seen"] == seen, name
        params = count_params(load_model(available()[name]).model)
        assert rows[name]["params (non-zero)"].split(" (")[0] == f"{params['total']:,}", name


def test_the_cpu_build_of_torch_is_one_make_variable_away():
    text = README.read_text()
    assert f"make setup TORCH_INDEX={CPU_INDEX}" in text
    assert f"pip install torch==2.13.0 --index-url {CPU_INDEX}" in text
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    def torch_line(*args):
        out = subprocess.run(["make", "-n", "-B", "setup", *args], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        return next(line.strip() for line in out.splitlines() if "install" in line and "torch==" in line
                    and not line.lstrip().startswith("#"))
    assert torch_line() == ".venv/bin/pip install --quiet torch==2.13.0"  # the default: unchanged
    assert torch_line(f"TORCH_INDEX={CPU_INDEX}").endswith(f"torch==2.13.0 --index-url {CPU_INDEX}")


def test_the_readme_is_a_landing_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 180
    for heading in ("## Set up", "## Two commands", "## Credits"):
        assert heading in text
    assert "Magapu" in text and "Jaiswal" in text and "docs/figures/shipped.png" in text
