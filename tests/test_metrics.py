import math

import time

import pytest
import torch

from minidiff import metrics as M


def _feats(n=400, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).relu() + 0.1 * torch.randn(n, d, generator=g)


def _exact_gaussian(n, mean, cov, seed):
    """n samples whose sample mean and (unbiased) sample covariance equal ``mean`` and ``cov``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, mean.shape[0], generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # whiten: cov(z) = I
    return mean + z @ torch.linalg.cholesky(cov).T


def _sqrtm_psd(a):
    w, v = torch.linalg.eigh(a)
    return v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T


# ---------------------------------------------------------------- Fréchet distance
def test_frechet_distance_of_a_set_with_itself_is_zero():
    f = _feats()
    assert M.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_grows_with_added_noise():
    f = _feats()
    noise = torch.randn(f.shape, generator=torch.Generator().manual_seed(1))
    values = [M.frechet_distance(f, f + s * noise) for s in (0.0, 0.05, 0.2, 0.5, 1.0, 2.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-8)
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_frechet_distance_equals_the_closed_form_for_diagonal_gaussians():
    mu1, var1 = torch.tensor([0.0, 1.0, -2.0, 0.5]), torch.tensor([1.0, 0.25, 4.0, 2.0])
    mu2, var2 = torch.tensor([1.0, 1.0, 0.0, -0.5]), torch.tensor([2.0, 1.0, 1.0, 0.5])
    a = _exact_gaussian(300, mu1.double(), torch.diag(var1).double(), seed=0)
    b = _exact_gaussian(500, mu2.double(), torch.diag(var2).double(), seed=1)
    closed = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * (var1 * var2).sqrt()).sum()
    assert M.frechet_distance(a, b) == pytest.approx(closed.item(), rel=1e-7)


def test_frechet_distance_uses_the_matrix_square_root_of_the_product():
    # full covariances: tr√(Σa Σb) = tr√(√Σa Σb √Σa), computed here independently with eigh
    g = torch.Generator().manual_seed(3)
    qa, qb = torch.randn(5, 5, generator=g).double(), torch.randn(5, 5, generator=g).double()
    cov_a, cov_b = qa @ qa.T + 0.1 * torch.eye(5), qb @ qb.T + 0.1 * torch.eye(5)
    mu_a, mu_b = torch.randn(5, generator=g).double(), torch.randn(5, generator=g).double()
    a = _exact_gaussian(200, mu_a, cov_a, seed=4)
    b = _exact_gaussian(200, mu_b, cov_b, seed=5)
    ra = _sqrtm_psd(cov_a)
    expected = ((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a + cov_b - 2 * _sqrtm_psd(ra @ cov_b @ ra))
    assert M.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-7)


def test_frechet_distance_streams_in_chunks_without_changing_the_value():
    a, b = _feats(seed=0), _feats(seed=1) + 0.3
    assert M.frechet_distance(a, b, chunk=7) == pytest.approx(M.frechet_distance(a, b), rel=1e-9)


@pytest.mark.parametrize("a,b", [(torch.zeros(1, 4), torch.zeros(5, 4)),
                                 (torch.zeros(5, 4), torch.zeros(5, 3)),
                                 (torch.full((5, 4), float("nan")), torch.zeros(5, 4))])
def test_frechet_distance_rejects_bad_input(a, b):
    with pytest.raises(ValueError):
        M.frechet_distance(a, b)


def test_floor_subsets_are_disjoint_and_reproducible():
    a, b = M.disjoint_subsets(100, 30, seed=0)
    assert len(a) == len(b) == 30
    assert not set(a.tolist()) & set(b.tolist())
    a2, b2 = M.disjoint_subsets(100, 30, seed=0)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    a, b = M.disjoint_subsets(101, 1000, seed=1)  # 2n > available: n = available // 2
    assert len(a) == len(b) == 50 and not set(a.tolist()) & set(b.tolist())


def test_fid_floor_is_the_distance_between_the_two_subsets():
    f = _feats(n=200)
    floor = M.fid_floor(f, 60, seed=2)
    a, b = M.disjoint_subsets(200, 60, seed=2)
    assert floor["value"] == pytest.approx(M.frechet_distance(f[a], f[b]))
    assert floor["n_used"] == 60 and "note" not in floor
    assert floor["value"] > 0  # disjoint halves of a finite sample never coincide
    short = M.fid_floor(f, 150, seed=2)
    assert short["n_requested"] == 150 and short["n_used"] == 100 and "100" in short["note"]


# ---------------------------------------------------------------- SSIM
def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g) * 2 - 1


def test_ssim_of_an_image_with_itself_is_one():
    x = _images()
    s = M.ssim_pairs(x, x)
    assert s.shape == (6,)
    torch.testing.assert_close(s, torch.ones(6), atol=1e-5, rtol=0)
    assert (M.ssim_pairs(x, _images(seed=1)) < 0.5).all()


def test_ssim_chunks_do_not_change_values():
    a, b = _images(seed=0), _images(seed=1)
    torch.testing.assert_close(M.ssim_pairs(a, b, chunk=4), M.ssim_pairs(a, b))


def test_ssim_paper_pairs_each_sample_with_a_random_real_image():
    real = _images(n=10, seed=3)
    idx = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(7))
    samples = real[idx]  # exactly the images the paper's pairing will draw
    s = M.ssim_paper(samples, real, torch.Generator().manual_seed(7))
    torch.testing.assert_close(s, torch.ones(4), atol=1e-5, rtol=0)


def test_ssim_rejects_uint8_and_mismatched_shapes():
    with pytest.raises(ValueError, match="float"):
        u8 = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
        M.ssim_pairs(u8, u8)
    with pytest.raises(ValueError, match="equal shapes"):
        M.ssim_pairs(_images(n=2), _images(n=3))


# ---------------------------------------------------------------- classifier-based
def test_digit_distribution_of_a_uniform_set():
    probs = torch.eye(10).repeat(7, 1)
    d = M.digit_distribution(probs)
    assert d["counts"] == [7] * 10 and sum(d["counts"]) == d["n"] == 70
    assert d["chi2"] == 0.0 and d["p_value"] == pytest.approx(1.0)
    assert d["mean_confidence"] == pytest.approx(1.0)


def test_digit_distribution_chi2_and_p_value():
    probs = torch.full((100, 10), 0.05)
    probs[:, 0] = 0.55  # every sample predicted as 0, confidence 0.55
    d = M.digit_distribution(probs)
    assert d["counts"] == [100] + [0] * 9
    assert d["chi2"] == pytest.approx(90 ** 2 / 10 + 9 * 10 ** 2 / 10)
    assert d["p_value"] < 1e-100 and d["mean_confidence"] == pytest.approx(0.55)
    # p-value against an independent closed form of the χ² survival function
    counts = torch.tensor([14, 9, 6, 11, 10, 10, 12, 8, 15, 5])
    d = M.digit_distribution(torch.eye(10).repeat_interleave(counts, dim=0))
    assert d["chi2"] == pytest.approx(((counts - 10.0) ** 2 / 10).sum().item())
    assert d["p_value"] == pytest.approx(_chi2_sf_odd_dof(d["chi2"], 9), rel=1e-9)


def _chi2_sf_odd_dof(x, dof):
    """P(χ²_dof > x) for odd dof (Abramowitz & Stegun 26.4.4)."""
    series, term = 0.0, math.sqrt(x)
    for r in range(1, (dof - 1) // 2 + 1):
        series += term
        term *= x / (2 * r + 1)
    return math.erfc(math.sqrt(x / 2)) + 2 * math.exp(-x / 2) / math.sqrt(2 * math.pi) * series


def test_chi2_reference_is_right():
    assert _chi2_sf_odd_dof(16.919, 9) == pytest.approx(0.05, abs=2e-5)  # χ²(9) 95 % quantile
    assert _chi2_sf_odd_dof(2.088, 9) == pytest.approx(0.99, abs=2e-5)


def test_classifier_metrics_reject_non_probabilities():
    with pytest.raises(ValueError, match="summing to 1"):
        M.digit_distribution(torch.ones(4, 10))
    with pytest.raises(ValueError, match="summing to 1"):
        M.inception_score(torch.randn(4, 10))


def test_inception_score_bounds():
    assert M.inception_score(torch.eye(10).repeat(5, 1)) == pytest.approx(10.0)
    same = torch.softmax(torch.randn(1, 10), dim=1).repeat(50, 1)
    assert M.inception_score(same) == pytest.approx(1.0)
    assert 1.0 < M.inception_score(torch.softmax(3 * torch.randn(50, 10), dim=1)) < 10.0


def test_precision_recall_of_a_set_with_itself_is_one():
    f = _feats(n=300)
    pr = M.precision_recall(f, f, k=3, chunk=64)
    assert pr["precision"] == 1.0 and pr["recall"] == 1.0


def test_precision_recall_of_far_apart_sets_is_zero_and_asymmetric_coverage():
    real = _feats(n=200, seed=0)
    pr = M.precision_recall(real, real + 100.0, k=3)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0
    # fakes collapsed onto a few real points: precise, but recall is low
    collapsed = real[:5].repeat(20, 1) + 1e-4 * torch.randn(100, real.shape[1])
    pr = M.precision_recall(real, collapsed, k=3)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.2


# ---------------------------------------------------------------- efficiency
def test_count_params_sees_pruning_masks():
    import torch.nn.utils.prune as prune
    lin = torch.nn.Linear(10, 10)
    assert M.count_params(lin) == {"total": 110, "nonzero": 110}
    prune.l1_unstructured(lin, "weight", amount=0.3)  # mask attached, weight_orig dense
    assert M.count_params(lin) == {"total": 110, "nonzero": 80}
    prune.remove(lin, "weight")
    assert M.count_params(lin) == {"total": 110, "nonzero": 80}


def test_macs_per_eval_matches_hand_counts_and_the_spec():
    assert M.macs_per_eval(torch.nn.Linear(10, 5), torch.zeros(1, 10)) == 50
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    assert M.macs_per_eval(conv, torch.zeros(1, 1, 28, 28)) == 28 * 28 * 4 * 9
    from minidiff.config import ModelConfig
    from minidiff.models.unet import SimpleUnet
    macs = M.macs_per_eval(SimpleUnet(ModelConfig.from_arch("reduced")), torch.zeros(1, 1, 28, 28),
                           torch.zeros(1))
    assert macs == pytest.approx(0.099e9, rel=0.01)  # SPEC §3


def test_checkpoint_bytes_and_latency(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"x" * 1234)
    assert M.checkpoint_bytes(p) == 1234
    calls = []

    def ten_ms():  # a known duration: a per-run figure must land near it, not at n× or 0
        calls.append(1)
        time.sleep(0.01 if len(calls) > 2 else 0.2)  # the two warm-up runs are slow and not timed
    t = M.measure_latency(ten_ms, n=4, warmup=2)
    assert len(calls) == 6 and t["runs"] == 4 and t["warmup_runs"] == 2
    assert 0.01 <= t["min_s"] <= t["median_s"] <= t["max_s"] < 0.1
    with pytest.raises(ValueError):
        M.measure_latency(lambda: None, n=0)


def test_digit_distribution_against_given_proportions():
    share = torch.tensor([2.0] + [1.0] * 9)  # class 0 twice as likely
    counts = torch.tensor([20] + [10] * 9)
    d = M.digit_distribution(torch.eye(10).repeat_interleave(counts, dim=0), expected=share)
    assert d["chi2"] == pytest.approx(0.0, abs=1e-12) and d["reference"] == "given proportions"
    with pytest.raises(ValueError, match="positive proportions"):
        M.digit_distribution(torch.eye(10), expected=torch.zeros(10))
