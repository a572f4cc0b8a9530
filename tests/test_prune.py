import pytest
import torch
from torch import nn

from minidiff import checkpoint as C
from minidiff import prune as P
from minidiff.checkpoint import CheckpointError
from minidiff.config import ModelConfig, SamplingSpec, train_config
from minidiff.diffusion import make_schedule, p_losses
from minidiff.metrics import macs_per_eval
from minidiff.metrics import count_params
from minidiff.models.unet import SimpleUnet, build_from_state_dict
from minidiff.modelfile import load_model, save_model
from minidiff.train import train

CFG = ModelConfig.from_arch("reduced")
X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
T = torch.tensor([0.0, 57.0, 199.0])


def _model(seed: int = 0) -> SimpleUnet:
    torch.manual_seed(seed)
    return SimpleUnet(CFG)


def _macs(model: nn.Module) -> int:  # FlopCounterMode, one image
    return macs_per_eval(model, torch.zeros(1, 1, 28, 28), torch.zeros(1))


# ---------------------------------------------------------------- paper method
def test_paper_prune_reaches_the_requested_sparsity_and_keeps_every_parameter():
    model = _model()
    n_params = count_params(model)["total"]
    masks = P.paper_prune(model)
    assert count_params(model)["total"] == n_params  # the paper's finding: pruning saves nothing dense
    assert not any(hasattr(m, "weight_orig") for m in model.modules())  # prune.remove ran
    report = P.sparsity_report(model)
    assert set(masks) == {f"{n}.weight" for n in report["layers"]}  # every Conv/ConvT/Linear
    for name, layer in report["layers"].items():
        # torch rounds amount × count to whole weights / filters (10 % of 32 filters is 3)
        assert layer["zeros"] >= round(0.3 * layer["numel"]), name
        assert layer["sparsity"] >= 0.3 - 0.5 / layer["numel"], name
        if "filters" in layer:
            assert layer["zero_filters"] >= round(0.1 * layer["filters"]), name
        assert layer["zeros"] == int((~masks[f"{name}.weight"]).sum()), name
    convs = [v for v in report["layers"].values() if "filters" in v and v["filters"] >= 10]
    assert sum(v["zero_filters"] for v in convs) / sum(v["filters"] for v in convs) >= 0.09
    assert report["overall"] >= 0.3
    # a Conv2d combines both: 1 − 0.9 × 0.7 of its weights
    assert report["layers"]["mid1.conv1"]["sparsity"] == pytest.approx(0.37, abs=0.01)
    assert not any((torch.signbit(p) & (p == 0)).any() for p in model.parameters())  # +0.0 only


def test_paper_prune_includes_conv_transpose_and_skips_its_filters():
    model = _model()
    P.paper_prune(model)
    up = P.sparsity_report(model)["layers"]["ups.0.up"]
    assert up["zeros"] == round(0.3 * up["numel"]) and "filters" not in up


@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                                      lambda ps: torch.optim.Adam(ps, lr=1e-2)], ids=["sgd-momentum", "adam"])
def test_masks_keep_pruned_weights_zero_through_optimizer_steps(make_opt):
    model = _model()
    opt = make_opt(model.parameters())
    sched, g = make_schedule(), torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad()
        p_losses(model, sched, X, g).backward()
        opt.step()

    step()  # a dense step first: every weight has momentum (SGD) or moments (Adam) when pruned
    masks = P.paper_prune(model)
    pruned = {name: model.get_parameter(name).detach().clone() for name in masks}
    for i in range(3):  # a mask applied once, or to the gradient only, lets momentum refill the zeros
        step()
        P.apply_masks(model, masks)
        for name, mask in masks.items():
            assert (model.get_parameter(name)[~mask] == 0).all(), (i, name)
    for name, mask in masks.items():
        w = model.get_parameter(name)
        assert (w[mask] != 0).float().mean() > 0.99, name  # the rest still trains
        assert (w[mask] != pruned[name][mask]).float().mean() > 0.9, name
    # without the masks one step refills most zeros: the paper's pruned model was dense again
    # (filters zeroed before a BatchNorm get no gradient, so a few per cent stay zero)
    step()
    assert P.sparsity_report(model)["overall"] < 0.1


def test_fine_tuning_with_masks_keeps_the_zeros_in_every_file(tmp_path, tiny_mnist):
    # train() applies the masks to the initial weights and after every optimizer step (Adam)
    model = _model()
    masks = P.paper_prune(model)
    cfg = train_config("smoke", "reduced", epochs=1, batch_size=4, train_subset=8, sample_every=0,
                       sampling=SamplingSpec("ddim", 1), bn_recalib_batches=0)  # two steps, the least work around them
    path = train(cfg, tiny_mnist, tmp_path, init_state=model.state_dict(), masks=masks,
                 progress=False, log=lambda *_: None)
    raw, _ = C.load(tmp_path / "model_raw.safetensors")
    ema, _ = C.load(path)  # ema_decay 0.9: the EMA of masked weights is masked too
    for name, mask in masks.items():
        assert (raw[name][~mask] == 0).all() and (ema[name][~mask] == 0).all(), name
        assert not torch.equal(raw[name], model.get_parameter(name).detach()), name  # it trained


def test_masks_from_zeros_recovers_the_masks():
    model = _model()
    masks = P.paper_prune(model)
    again = P.masks_from_zeros(model, sorted(masks))
    assert all(torch.equal(again[k], masks[k]) for k in masks)


def test_paper_prune_rejects_bad_amounts():
    with pytest.raises(ValueError, match="unstructured"):
        P.paper_prune(_model(), unstructured=1.0)
    with pytest.raises(ValueError, match="structured"):
        P.paper_prune(_model(), structured=-0.1)
    with pytest.raises(ValueError, match="shape"):
        P.apply_masks(_model(), {"head.weight": torch.ones(2, dtype=torch.bool)})


# ---------------------------------------------------------------- structural pruning
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_structural_prune_removes_channels_and_keeps_a_valid_network(ratio):
    dense = _model()
    params, macs = count_params(dense)["total"], _macs(dense)
    model = P.structural_prune(_model(), ratio)
    assert count_params(model)["total"] < params
    assert _macs(model) < macs
    if ratio == 0.5:
        assert count_params(model)["total"] < 0.35 * params  # widths halve, so weights fall ~4x
    assert isinstance(model.head, nn.Conv2d) and model.head.out_channels == 1
    assert model.head.kernel_size == (1, 1)
    assert model.time_mlp[0].freqs.numel() == CFG.time_emb_dim // 2  # embedding untouched
    model.eval()
    with torch.no_grad():
        y = model(X, T)
        assert y.shape == (3, 1, 28, 28) and torch.isfinite(y).all()
        rebuilt = build_from_state_dict(CFG, model.state_dict()).eval()
        assert torch.equal(rebuilt(X, T), y)
    assert P.widths(rebuilt) == P.widths(model)


def test_structural_prune_is_monotone_in_the_ratio():
    params = [count_params(P.structural_prune(_model(), r))["total"] for r in (0.1, 0.3, 0.5)]
    assert params[0] > params[1] > params[2]


def test_taylor_importance_uses_loss_gradients_and_leaves_bn_statistics_alone(tiny_mnist):
    model = _model()
    tracked = {n: b.clone() for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}
    P.structural_prune(model, 0.3, "taylor", example_data=tiny_mnist, sched=make_schedule(),
                       taylor_batches=2, batch_size=16)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(b, tracked[n]) for n, b in model.named_buffers() if n in tracked)
    l1 = P.structural_prune(_model(), 0.3, "l1")
    assert count_params(model)["total"] == count_params(l1)["total"]  # same widths, other channels
    assert not torch.equal(model.stem.weight, l1.stem.weight)
    assert model.eval()(X, T).shape == (3, 1, 28, 28)


def test_structural_prune_rejects_bad_input():
    with pytest.raises(ValueError, match="ratio"):
        P.structural_prune(_model(), 0.0)
    with pytest.raises(ValueError, match="importance"):
        P.structural_prune(_model(), 0.3, "l2")
    with pytest.raises(ValueError, match="example_data"):
        P.structural_prune(_model(), 0.3, "taylor")


# ---------------------------------------------------------------- sparse storage
def _sparse_state(unstructured: float) -> dict[str, torch.Tensor]:
    model = _model()
    P.paper_prune(model, structured=0.0, unstructured=unstructured)
    return model.state_dict()


def test_sparse_files_shrink_with_sparsity_and_beat_dense_files(tmp_path):
    from minidiff.checkpoint import save
    sizes = []
    for amount in (0.3, 0.5, 0.8):
        state = _sparse_state(amount)
        dense = save(tmp_path / f"dense{amount}.safetensors", state, {"kind": "model"}).stat().st_size
        sparse = C.save_sparse(tmp_path / f"sparse{amount}.safetensors", state, {"kind": "model"})
        sizes.append(sparse.stat().st_size)
        assert sizes[-1] < dense
    assert sizes[0] > sizes[1] > sizes[2]
    # fp32 with a 1-bit mask: ≈ (1 − s) + 1/32 of the dense bytes
    assert sizes[2] < 0.3 * dense


def test_sparse_reload_is_bit_exact(tmp_path):
    state = _sparse_state(0.5)
    w = state["mid1.conv1.weight"]
    w.view(-1)[:4] = torch.tensor([-0.0, float("nan"), float("inf"), 0.0])
    state["extra.half"] = torch.tensor([0.0, -0.0, 0.0, 0.0, 0.0, 1.5] * 4, dtype=torch.float16)
    state["extra.bf16"] = torch.zeros(40, dtype=torch.bfloat16)  # all zero: no values stored
    state["extra.scalar"] = torch.tensor(-0.0)
    path = C.save_sparse(tmp_path / "s.safetensors", state, {"kind": "model"})
    loaded, meta = C.load_sparse(path)
    assert "mid1.conv1.weight" in meta["sparse"]["tensors"]
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
        a, b = loaded[k].contiguous(), v.contiguous()
        assert torch.equal(a.view(torch.uint8) if a.dim() else a.reshape(1).view(torch.uint8),
                           b.view(torch.uint8) if b.dim() else b.reshape(1).view(torch.uint8)), k
    model = build_from_state_dict(CFG, _sparse_state(0.5))
    again = build_from_state_dict(CFG, C.load_sparse(C.save_sparse(
        tmp_path / "m.safetensors", model.state_dict(), {}))[0])
    assert torch.equal(model.eval()(X, T), again.eval()(X, T))


def test_sparse_decode_detects_inconsistent_files():
    tensors, index = C.encode_sparse({"w": torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0] * 8)})
    tensors["w@values"] = tensors["w@values"][:-1]
    with pytest.raises(CheckpointError, match="do not agree"):
        C.decode_sparse(tensors, index)


# ---------------------------------------------------------------- checkpoint glue
@pytest.mark.parametrize("method", ["paper", "sparse", "structural"])
def test_prune_checkpoint_writes_a_self_describing_file(tmp_path, method):
    cfg = train_config("smoke", "reduced")
    src = save_model(tmp_path / "model.safetensors", _model(), cfg, step=8, weights="raw")
    out = P.prune_checkpoint(src, method, 0.3, "l1", tmp_path / f"{method}.safetensors")
    state, meta = C.load_sparse(out)
    info = meta["pruning"]
    assert info["method"] == method and info["ratio"] == 0.3 and meta["step"] == 8
    model = build_from_state_dict(ModelConfig(**meta["model"]), state)
    assert P.widths(model) == info["widths"]
    if method == "structural":
        assert info["params_after"] < info["params_before"] and info["masked"] == []
        assert load_model(out).model(X, T).shape == (3, 1, 28, 28)  # no torch-pruning needed
    else:
        assert info["params_after"] == info["params_before"] and info["sparsity"] >= 0.3
        masks = P.masks_from_zeros(model, info["masked"])
        assert sum(int((~m).sum()) for m in masks.values()) == P.sparsity_report(model)["zeros"]
    if method == "sparse":
        assert out.stat().st_size < src.stat().st_size


def test_prune_checkpoint_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="method"):
        P.prune_checkpoint(tmp_path / "none.safetensors", "magic", 0.3)
