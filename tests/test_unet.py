import pytest
import torch

from minidiff.config import ModelConfig
from minidiff.metrics import count_params
from minidiff.models.unet import SimpleUnet, build_from_state_dict


@pytest.mark.parametrize("arch, params", [("baseline", 2_529_217), ("reduced", 634_081),
                                          ("shallow", 2_148_097)])
def test_parameter_counts_are_the_papers(arch, params):
    assert count_params(SimpleUnet(ModelConfig.from_arch(arch)))["total"] == params


@pytest.mark.parametrize("arch", ["baseline", "reduced", "shallow"])
def test_forward_shape_and_time_dependence(arch):
    torch.manual_seed(0)
    m = SimpleUnet(ModelConfig.from_arch(arch)).eval()
    x = torch.randn(3, 1, 28, 28)
    y0 = m(x, torch.zeros(3))
    y1 = m(x, torch.full((3,), 150.0))
    assert y0.shape == (3, 1, 28, 28)
    assert not torch.allclose(y0, y1)  # the timestep reaches the output


def test_sinusoidal_embedding_closed_form():
    m = SimpleUnet(ModelConfig((16, 32), 8))
    emb = m.time_mlp[0](torch.tensor([0.0, 3.0]))
    k = torch.arange(4)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * k / 3)
    torch.testing.assert_close(emb[1], torch.cat([torch.sin(3 * freqs), torch.cos(3 * freqs)]))
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    m = SimpleUnet(ModelConfig.from_arch("reduced")).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5.0, 100.0])
    y = m(x, t)
    m = m.to(memory_format=torch.channels_last)
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last), t), y,
                               atol=1e-5, rtol=1e-4)


def test_build_from_state_dict_roundtrip_and_narrow_layers():
    torch.manual_seed(0)
    cfg = ModelConfig.from_arch("reduced")
    m = SimpleUnet(cfg).eval()
    sd = m.state_dict()
    m2 = build_from_state_dict(cfg, sd)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(m2(x, t), m(x, t))
    # narrow one inner width consistently (what structural pruning does) and rebuild
    keep = torch.arange(10)
    sd = dict(sd)
    for k in ("mid1.conv1.weight", "mid1.conv1.bias", "mid1.bn1.weight", "mid1.bn1.bias",
              "mid1.bn1.running_mean", "mid1.bn1.running_var", "mid1.time_mlp.weight", "mid1.time_mlp.bias"):
        sd[k] = sd[k][keep]
    sd["mid1.conv2.weight"] = sd["mid1.conv2.weight"][:, keep]
    m3 = build_from_state_dict(cfg, sd)
    assert m3.mid1.conv1.out_channels == 10
    assert m3(x, t).shape == (2, 1, 28, 28)


def test_build_rejects_weights_that_do_not_fit():
    sd = SimpleUnet(ModelConfig.from_arch("reduced")).state_dict()
    with pytest.raises(ValueError, match="do not fit a SimpleUnet"):
        build_from_state_dict(ModelConfig.from_arch("shallow"), sd)
    sd["mid1.conv1.weight"] = sd["mid1.conv1.weight"][:10]  # inconsistent with its BN
    with pytest.raises(ValueError, match="do not fit"):
        build_from_state_dict(ModelConfig.from_arch("reduced"), sd)


def test_folded_batchnorm_gives_the_same_output():
    from minidiff.models.unet import fold_batchnorm
    torch.manual_seed(0)
    m = SimpleUnet(ModelConfig.from_arch("reduced"))
    m.train()
    for _ in range(3):  # give BN non-trivial running statistics
        m(torch.randn(8, 1, 28, 28) * 2 + 0.3, torch.randint(0, 200, (8,)).float())
    m.eval()
    folded = fold_batchnorm(m)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in folded.modules())
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # original untouched
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([0.0, 10.0, 100.0, 199.0])
    with torch.no_grad():
        torch.testing.assert_close(folded(x, t), m(x, t), atol=1e-5, rtol=1e-5)
