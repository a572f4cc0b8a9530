import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_mnist():
    """A deterministic fake MNIST slice (no network, no cache): 64 images of blobs, labels 0..9."""
    from minidiff.data import MNIST
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 28, 28, generator=g) * 255).to(torch.uint8)
    images[:, :6] = 0
    labels = torch.arange(64) % 10
    return MNIST(images, labels.to(torch.uint8))
