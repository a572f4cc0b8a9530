import hashlib

import pytest
import torch

from minidiff.config import ModelConfig
from minidiff.diffusion import make_schedule
from minidiff.figures import make_all
from minidiff.models.unet import SimpleUnet


@pytest.mark.slow
def test_figures_are_written_and_deterministic(tmp_path, tiny_mnist):
    torch.manual_seed(0)
    model = SimpleUnet(ModelConfig((8, 16), 16)).eval()
    sched = make_schedule()
    student = SimpleUnet(ModelConfig((8, 16), 16)).eval()
    first = make_all(tmp_path / "a", sched, tiny_mnist, model, student)
    assert [p.name for p in first] == ["schedule.png", "forward.png", "reverse.png",
                                       "predictions.png", "steps.png", "student.png"]
    second = make_all(tmp_path / "b", sched, tiny_mnist, model, student)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for a, b in zip(first, second):
        assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert digest(a) == digest(b), a.name
    assert len(make_all(tmp_path / "c", sched, tiny_mnist)) == 2  # no model: model-free figures only
    assert len(make_all(tmp_path / "d", sched, tiny_mnist, model)) == 5  # no student: no student figure
