import pytest
import torch

from minidiff.checkpoint import tensors_digest
from minidiff.data import MNIST
from minidiff import classifier as C
from minidiff.models.classifier import MnistClassifier, predict


def _bars(n, seed):
    """A learnable stand-in for MNIST: class c is a bright horizontal bar at row 2 + 2c, on noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = (torch.rand(n, 28, 28, generator=g) * 80).to(torch.uint8)
    for i, c in enumerate(labels.tolist()):
        images[i, 2 + 2 * c:4 + 2 * c, 4:24] = 255
    return MNIST(images, labels.to(torch.uint8))


def test_shapes_and_input_convention():
    m = MnistClassifier().eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1                    # [-1, 1], (B, 1, 28, 28)
    assert m(x).shape == (3, 10) and m.features(x).shape == (3, 128) == (3, m.num_features)
    feats, probs = predict(m, x, batch_size=2)
    torch.testing.assert_close(feats, m.features(x))
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


def test_training_improves_held_out_accuracy():
    train, test = _bars(320, seed=0), _bars(100, seed=1)
    torch.manual_seed(0)
    before = C.accuracy(MnistClassifier(), test)
    rng = torch.get_rng_state()
    model, info = C.train_classifier(train, test, epochs=2, batch_size=32, progress=False,
                                     log=lambda *_: None)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert info["test_accuracy"] == C.accuracy(model, test)
    assert before < 0.3 and info["test_accuracy"] > 0.9


def test_classifier_cache_round_trip(tmp_path):
    train, test = _bars(64, seed=0), _bars(20, seed=1)
    logs = []
    kw = dict(epochs=0.5, batch_size=32, train=train, test=test, progress=False, log=logs.append)
    m1, i1 = C.load_or_train_classifier(tmp_path, **kw)
    assert not i1["cached"] and i1["sha256"] == tensors_digest(m1.state_dict())
    m2, i2 = C.load_or_train_classifier(tmp_path, **kw)
    assert i2["cached"] and i2["sha256"] == i1["sha256"] and i2["test_accuracy"] == i1["test_accuracy"]
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(m1.eval()(x), m2(x))
    # a corrupt cache file is reported and replaced
    path = tmp_path / i1["path"].rsplit("/", 1)[-1]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    _, i3 = C.load_or_train_classifier(tmp_path, **kw)
    assert not i3["cached"] and any("training the classifier again" in m for m in logs)


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path))
    assert C.default_cache_dir() == tmp_path / "classifier"
    name = C.cache_path(epochs=3, seed=0).name
    assert name == f"classifier_v{C.RECIPE_VERSION}_n60000_e3_s0_b128.safetensors"


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        C.train_classifier(_bars(20, 0), _bars(20, 1), epochs=0)
