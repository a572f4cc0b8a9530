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


def test_random_subset_is_reproducible_distinct_and_capped():
    a = M.random_subset(100, 30, seed=0)
    assert len(a) == len(set(a.tolist())) == 30 and torch.equal(a, M.random_subset(100, 30, seed=0))
    assert not torch.equal(a, M.random_subset(100, 30, seed=1))
    assert sorted(M.random_subset(10, 1000, seed=1).tolist()) == list(range(10))  # n > available: all
    with pytest.raises(ValueError):
        M.random_subset(0, 5, seed=0)


def test_fid_floor_is_n_pool_draws_against_the_whole_reference():
    pool, ref = _feats(n=300, seed=1), _feats(n=500, seed=2)
    floor = M.fid_floor(pool, ref, 60, seed=2)
    idx = M.random_subset(300, 60, seed=2)
    assert floor["value"] == pytest.approx(M.frechet_distance(pool[idx], ref))
    assert (floor["n_used"], floor["n_reference"]) == (60, 500) and "note" not in floor
    short = M.fid_floor(pool, ref, 400, seed=2)
    assert short["n_requested"] == 400 and short["n_used"] == 300 and "300" in short["note"]


def test_the_floor_is_what_a_perfect_generator_scores_in_expectation():
    """A perfect generator draws from the data distribution: its n samples scored against the
    m reference images must average to the floor. The old floor (two disjoint real subsets of n)
    carries the 1/n bias twice and comes out ≈ (2/n)/(1/n + 1/m) ≈ 1.8× too high here."""
    n, m, d, reps = 100, 1000, 4, 100
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(d, d, generator=g)                    # a correlated Gaussian "data set"
    draw = lambda k: torch.randn(k, d, generator=g) @ mix   # noqa: E731
    ref, pool = draw(m), draw(20_000)                       # test set; training set
    perfect = sum(M.frechet_distance(draw(n), ref) for _ in range(reps)) / reps
    floor = sum(M.fid_floor(pool, ref, n, seed=s)["value"] for s in range(reps)) / reps
    n_vs_n = sum(M.frechet_distance(draw(n), draw(n)) for _ in range(reps)) / reps
    assert floor == pytest.approx(perfect, rel=0.12)
    assert n_vs_n / perfect > 1.5


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
    collapsed = real[:5].repeat(40, 1) + 1e-4 * torch.randn(200, real.shape[1])
    pr = M.precision_recall(real, collapsed, k=3)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.2


def _brute_force_pr(real, fake, k):
    """Kynkäänniemi et al.'s definition, one point at a time (float64)."""
    def radii(x):
        return [sorted(float((x[i] - x[j]).norm()) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    def coverage(points, centres, r):
        return sum(any(float((p - c).norm()) <= rc for c, rc in zip(centres, r)) for p in points) / len(points)
    real, fake = real.double(), fake.double()
    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_a_brute_force_reference(k):
    g = torch.Generator().manual_seed(k)
    real = torch.randn(40, 5, generator=g)
    fake = 0.8 * torch.randn(40, 5, generator=g) + 0.5  # overlapping, shifted, narrower
    pr = M.precision_recall(real, fake, k=k, chunk=7)
    assert (pr["precision"], pr["recall"]) == pytest.approx(_brute_force_pr(real, fake, k), abs=1e-12)
    assert 0 < pr["precision"] < 1 and 0 < pr["recall"] < 1 and (pr["k"], pr["n"]) == (k, 40)


def test_precision_recall_would_catch_an_off_by_one_in_k():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(40, 5, generator=g)
    fake = 0.8 * torch.randn(40, 5, generator=g) + 0.5
    got = M.precision_recall(real, fake, k=3)
    got = (got["precision"], got["recall"])
    assert got == pytest.approx(_brute_force_pr(real, fake, 3))
    assert got != pytest.approx(_brute_force_pr(real, fake, 2))  # radius of the 2nd neighbour
    assert got != pytest.approx(_brute_force_pr(real, fake, 4))  # ... or of the 4th


@pytest.mark.parametrize("n_real, n_fake, k, message", [
    (30, 20, 3, "equal size"), (20, 20, 0, "k must be"), (20, 20, 20, "k must be")])
def test_precision_recall_refuses_unequal_sets_and_impossible_k(n_real, n_fake, k, message):
    with pytest.raises(ValueError, match=message):
        M.precision_recall(torch.randn(n_real, 4), torch.randn(n_fake, 4), k=k)


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
    assert macs == pytest.approx(0.099e9, rel=0.01)  # the reduced model: ≈ 0.099 G MACs per image


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
