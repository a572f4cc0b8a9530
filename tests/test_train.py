import math

import pytest
import torch

from minidiff import train as T
from minidiff.modelfile import load_model
from minidiff.checkpoint import load
from minidiff.config import train_config
from minidiff.diffusion import make_schedule


def _cfg(**kw):
    return train_config("smoke", "reduced", **kw)


def test_smoke_training_writes_a_complete_run(tmp_path, tiny_mnist):
    path = T.train(_cfg(), tiny_mnist, tmp_path, progress=False, log=lambda *_: None)
    assert path == tmp_path / "model.safetensors"
    for f in ("checkpoint.safetensors", "config.json", "loss.csv", "samples.png"):
        assert (tmp_path / f).exists(), f
    assert list((tmp_path / "samples").glob("step_*.png"))
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss") and rows[-1].startswith("8,")
    model, _, meta = load_model(path)
    assert meta["kind"] == "model" and meta["weights"] == "ema" and meta["step"] == 8
    assert model(torch.zeros(1, 1, 28, 28), torch.zeros(1)).shape == (1, 1, 28, 28)


@pytest.mark.slow
def test_interrupted_run_resumes_bit_exactly(tmp_path, tiny_mnist, monkeypatch):
    cfg = _cfg(sample_every=0)
    T.train(cfg, tiny_mnist, tmp_path / "a", progress=False, log=lambda *_: None)

    real, calls = T.ema_update, []

    def crash_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(T, "ema_update", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, tiny_mnist, tmp_path / "b", progress=False, log=lambda *_: None)
    assert load(tmp_path / "b" / "checkpoint.safetensors")[1]["step"] == 4
    monkeypatch.setattr(T, "ema_update", real)
    T.train(cfg, tiny_mnist, tmp_path / "b", resume=True, progress=False, log=lambda *_: None)
    for f in ("checkpoint.safetensors", "model.safetensors"):
        ta, _ = load(tmp_path / "a" / f)
        tb, _ = load(tmp_path / "b" / f)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (f, k)
    assert (tmp_path / "a" / "loss.csv").read_text().splitlines()[1:] != []


def test_non_finite_loss_stops_with_step_and_lr(tmp_path, tiny_mnist, monkeypatch):
    real, calls = T.p_losses, []

    def nan_at_step_3(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(T, "p_losses", nan_at_step_3)
    with pytest.raises(T.TrainingDiverged, match=r"loss became nan or inf at step 2 \(lr 0.001\)"):
        T.train(_cfg(sample_every=0), tiny_mnist, tmp_path, progress=False, log=lambda *_: None)
    assert load(tmp_path / "checkpoint.safetensors")[1]["step"] == 2  # last good one kept


def test_lr_schedule_closed_form():
    cfg = train_config("quick", "baseline", lr=1e-3, warmup_steps=10, lr_schedule="cosine")
    assert T.lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert T.lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert T.lr_at(60, cfg, 110) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert T.lr_at(110, cfg, 110) == pytest.approx(1e-4)
    assert T.lr_at(50, train_config("paper", "baseline"), 1000) == 1e-3


def test_ema_update_formula():
    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(3.0)
    T.ema_update(ema, model, decay=0.9, step=10_000)
    assert ema.weight[0, 0].item() == pytest.approx(0.9 * 1 + 0.1 * 3)
    T.ema_update(ema, model, decay=0.9, step=0)  # warm-up: d = 1/10
    assert ema.weight[0, 0].item() == pytest.approx(0.1 * 1.2 + 0.9 * 3)


class _ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x, t):
        return self.bn(self.conv(x))


def test_bn_recalibration_replaces_stale_statistics(tiny_mnist):
    torch.manual_seed(0)
    m = _ConvBN()
    m.bn.running_mean.fill_(100.0)
    m.bn.running_var.fill_(1e-3)
    sched = make_schedule()
    T.recalibrate_bn(m, tiny_mnist, sched, n_batches=4, batch_size=16, seed=1)
    assert not m.training and m.bn.momentum == 0.1
    # independent estimate on fresh noised batches
    from minidiff.data import to_model_range
    from minidiff.diffusion import q_sample
    g = torch.Generator().manual_seed(99)
    x0 = to_model_range(tiny_mnist.images)
    t = torch.randint(0, 200, (64,), generator=g)
    with torch.no_grad():
        h = m.conv(q_sample(sched, x0, t, torch.randn(x0.shape, generator=g)))
    torch.testing.assert_close(m.bn.running_mean, h.mean((0, 2, 3)), atol=0.05, rtol=0.1)
    torch.testing.assert_close(m.bn.running_var, h.var((0, 2, 3)), atol=0.05, rtol=0.25)


def _rows(path):
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def test_loss_csv_logs_the_held_out_mse_at_every_grid_and_at_the_end(tmp_path, tiny_mnist):
    T.train(_cfg(), tiny_mnist, tmp_path, heldout=tiny_mnist, progress=False, log=lambda *_: None)
    rows = _rows(tmp_path / "loss.csv")
    assert [(r["step"], bool(r["heldout_mse"])) for r in rows] == [("4", True), ("8", True)]  # grid at 4, end at 8
    # the logged value is the raw weights' ε-MSE on the fixed batch, recomputed here from the file
    raw, sched, _ = load_model(tmp_path / "model_raw.safetensors")
    again = T._Heldout(tiny_mnist, sched, torch.device("cpu")).mse(raw, "fp32", torch.contiguous_format)
    assert float(rows[-1]["heldout_mse"]) == pytest.approx(again, abs=2e-6)
    assert 0.1 < again < 10  # an ε-MSE of a barely trained network: near 1


def test_loss_csv_leaves_the_held_out_column_empty_without_test_images(tmp_path, tiny_mnist):
    T.train(_cfg(sample_every=0), tiny_mnist, tmp_path, progress=False, log=lambda *_: None)
    assert [r["heldout_mse"] for r in _rows(tmp_path / "loss.csv")] == [""]


def test_the_meter_splits_the_loss_by_quartile_of_t():
    m = T._Meter(torch.device("cpu"))
    m.add(0, torch.tensor(2.5), torch.tensor([0, 49, 60, 120, 199]), torch.tensor([1.0, 1.0, 2.0, 3.0, 4.0]), 200, 5)
    m.add(1, torch.tensor(1.0), torch.tensor([199]), torch.tensor([6.0]), 200, 1)
    line, mean = m.row(2, 4, 1e-3, None)
    fields = line.strip().split(",")
    assert mean == pytest.approx(1.75)  # the mean of the two steps' losses
    assert [float(v) for v in fields[6:10]] == [1.0, 2.0, 3.0, 5.0] and fields[10] == ""
    assert m.first_bad_step() is None
    m.add(2, torch.tensor(float("inf")), torch.tensor([0]), torch.tensor([1.0]), 200, 1)
    m.add(3, torch.tensor(float("nan")), torch.tensor([0]), torch.tensor([1.0]), 200, 1)
    assert m.first_bad_step() == 2


def test_resuming_a_loss_csv_of_the_older_layout_keeps_its_values(tmp_path):
    log = tmp_path / "loss.csv"
    log.write_text("step,epoch,loss,lr,images_per_s,elapsed_s\n10,0.5,0.2,0.001,30.0,5.0\n20,1.0,0.1,0.001,30.0,9.0\n")
    T._start_log(log, 15)
    rows = _rows(log)
    assert list(rows[0]) == list(T._LOG_COLUMNS)
    assert [(r["step"], r["loss"], r["heldout_mse"]) for r in rows] == [("10", "0.2", "")]
