"""Fine-tuning a pruned model: teacher distillation's loss, and masks that survive a resume."""
import copy

import pytest
import torch
import torch.nn.functional as F

from minidiff import cli
from minidiff import checkpoint as ckpt
from minidiff import train as T
from minidiff.config import ConfigError, train_config
from minidiff.diffusion import make_schedule, p_losses, q_sample
from minidiff.modelfile import load_model, save_model
from minidiff.models.unet import SimpleUnet
from minidiff.prune import finetune_start, paper_prune

QUIET = dict(progress=False, log=lambda *_: None)


def _net(seed=0):
    cfg = train_config("smoke", "reduced")
    torch.manual_seed(seed)
    return SimpleUnet(cfg.model)


def _x0(n=4):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_distillation_loss_is_the_closed_form_on_the_same_xt_and_t():
    sched, x0 = make_schedule(), _x0()
    student, teacher = _net(0).eval(), _net(1).eval()
    loss = p_losses(student, sched, x0, torch.Generator().manual_seed(5), teacher=teacher, distill_weight=0.5)
    g = torch.Generator().manual_seed(5)  # the draws p_losses makes, in its order
    t = torch.randint(0, sched.T, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = q_sample(sched, x0, t, noise)
    with torch.no_grad():
        eps_s, eps_t = student(xt, t.float()), teacher(xt, t.float())
    want = F.mse_loss(eps_s, noise) + 0.5 * F.mse_loss(eps_s, eps_t)
    assert eps_s.sub(eps_t).abs().max() > 1e-3  # two different networks: the term is not zero
    assert torch.allclose(loss.detach(), want, rtol=1e-6, atol=0)


def test_distillation_off_equals_the_plain_loss_exactly():
    sched, x0, student = make_schedule(), _x0(), _net().eval()
    plain = p_losses(student, sched, x0, torch.Generator().manual_seed(3))
    same = p_losses(student, sched, x0, torch.Generator().manual_seed(3), teacher=student, distill_weight=0.0)
    assert torch.equal(plain, same)


def test_distillation_gradient_vanishes_when_student_is_the_teacher():
    sched, x0, student = make_schedule(), _x0(), _net().eval()

    def grads(teacher):
        student.zero_grad()
        p_losses(student, sched, x0, torch.Generator().manual_seed(2), teacher=teacher,
                 distill_weight=1.0, denoise_weight=0.0).backward()
        return [p.grad for p in student.parameters() if p.grad is not None]

    assert all(torch.count_nonzero(g) == 0 for g in grads(copy.deepcopy(student)))
    # another teacher pulls the student: the same check fails, so it can fail
    assert any(torch.count_nonzero(g) > 0 for g in grads(_net(1).eval()))


def test_a_teacher_and_its_weight_come_together():
    with pytest.raises(ConfigError, match="needs a teacher"):
        train_config("smoke", "reduced", distill_weight=1.0)
    with pytest.raises(ConfigError, match="needs a teacher"):
        train_config("smoke", "reduced", teacher="baseline")
    with pytest.raises(ConfigError, match="finite"):
        train_config("smoke", "reduced", distill_weight=float("inf"), teacher="baseline")


def test_the_command_line_refuses_a_weight_without_teacher(tmp_path, capsys):
    code = cli.main(["train", "--preset", "smoke", "--distill-weight", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "needs a teacher" in err


def test_distilled_training_uses_its_teacher(tmp_path, tiny_mnist):
    teacher = save_model(tmp_path / "teacher.safetensors", _net(1).eval(), train_config("smoke", "reduced"), 0)
    plain = T.train(train_config("smoke", "reduced", epochs=1, sample_every=0), tiny_mnist, tmp_path / "a", **QUIET)
    distil = T.train(train_config("smoke", "reduced", epochs=1, sample_every=0, distill_weight=1.0,
                                  teacher=str(teacher)), tiny_mnist, tmp_path / "b", **QUIET)
    la = (tmp_path / "a" / "loss.csv").read_text().splitlines()[1:]
    lb = (tmp_path / "b" / "loss.csv").read_text().splitlines()[1:]
    loss = lambda rows: [float(r.split(",")[2]) for r in rows]  # noqa: E731
    assert len(la) == len(lb) and all(b > a for a, b in zip(loss(la), loss(lb)))  # the added term is > 0
    assert load_model(distil).meta["config"]["teacher"] == str(teacher)
    assert plain.exists()


def test_a_missing_teacher_is_a_one_line_error(tmp_path, capsys):
    code = cli.main(["train", "--preset", "smoke", "--distill-weight", "1", "--teacher",
                     str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope.safetensors" in err
    assert not (tmp_path / "r").exists()  # nothing written: the run can be started again as it is


@pytest.mark.slow
def test_masks_survive_a_resume_that_is_not_told_about_them(tmp_path, tiny_mnist):
    cfg = train_config("smoke", "reduced", epochs=4, sample_every=0)
    net = _net()
    masks = paper_prune(net)
    T.train(cfg, tiny_mnist, tmp_path, init_state=net.state_dict(), masks=masks, minutes=0, **QUIET)
    assert ckpt.load(tmp_path / "checkpoint.safetensors")[1]["step"] == 1  # stopped early
    path = T.train(cfg, tiny_mnist, tmp_path, resume=True, **QUIET)  # no masks given
    model, _, meta = load_model(path)
    for name, keep in masks.items():
        assert torch.count_nonzero(model.get_parameter(name)[~keep]) == 0, name
    assert meta["pruning"]["masked"] == sorted(masks) and meta["pruning"]["finetuned"]
    # the fine-tuned file is still known as paper-pruned: fine-tuning it again keeps its zeros
    _, again, _ = finetune_start(path)
    assert again is not None and all(torch.equal(again[k] | masks[k], masks[k]) for k in masks)


@pytest.mark.parametrize("teacher", ["baseline", "file"])
def test_the_command_line_trains_with_a_teacher_by_name_or_file_and_records_it_as_typed(
        teacher, tmp_path, tiny_mnist, monkeypatch):
    import minidiff.data
    if teacher == "file":
        teacher = str(save_model(tmp_path / "t.safetensors", _net(1).eval(), train_config("smoke", "reduced"), 0))
    seen = {}

    def fake_train(cfg, data, out, **kw):  # the run itself is tested above; here: what reaches it
        seen["cfg"], seen["teacher"] = cfg, T.load_teacher(cfg, torch.device("cpu"))
    monkeypatch.setattr(minidiff.data, "load_split", lambda split, data_dir=None: tiny_mnist)
    monkeypatch.setattr(T, "train", fake_train)
    code = cli.main(["train", "--preset", "smoke", "--distill-weight", "1", "--teacher", teacher,
                     "--out", str(tmp_path / "r")])
    assert code == 0
    assert seen["cfg"].teacher == teacher  # a shipped name stays a name in the run's config
    assert not any(p.requires_grad for p in seen["teacher"].parameters())
