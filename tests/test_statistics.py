"""solvers.statistics: per-class sufficient statistics against direct computations."""

import numpy as np
import pytest
import torch

from zsadapt.solvers import mixture
from zsadapt.solvers.statistics import ClassStatistics


def _batch(seed, n=40, d=6, c=4):
    g = torch.Generator().manual_seed(seed)
    X = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    z = torch.softmax(3 * torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    return X, z


def test_of_matches_direct_loops():
    X, z = _batch(0)
    stats = ClassStatistics.of(X, z)
    Xn, zn = X.numpy(), z.numpy()
    for c in range(z.shape[1]):
        assert stats.counts[c].item() == pytest.approx(zn[:, c].sum())
        np.testing.assert_allclose(stats.sums[c].numpy(), (zn[:, c, None] * Xn).sum(0), atol=1e-12)
        np.testing.assert_allclose(stats.squares[c].numpy(), (zn[:, c, None] * Xn ** 2).sum(0), atol=1e-12)
        mu = (zn[:, c, None] * Xn).sum(0) / zn[:, c].sum()
        var = (zn[:, c, None] * (Xn - mu) ** 2).sum(0) / zn[:, c].sum()
        np.testing.assert_allclose(stats.means()[c].numpy(), mu, atol=1e-12)
        np.testing.assert_allclose(stats.variances()[c].numpy(), var, atol=1e-12)
    np.testing.assert_allclose(
        stats.resultant_lengths().numpy(),
        np.linalg.norm(zn.T @ Xn, axis=1) / zn.sum(0), atol=1e-12)


def test_sum_of_batches_equals_one_pass_over_concatenation():
    batches = [_batch(s, n=n) for s, n in ((1, 30), (2, 1), (3, 57))]
    total = ClassStatistics.zeros(4, 6, dtype=torch.float64)
    for X, z in batches:
        total = total + ClassStatistics.of(X, z)
    X = torch.cat([b[0] for b in batches])
    z = torch.cat([b[1] for b in batches])
    once = ClassStatistics.of(X, z)
    for key in ("counts", "sums", "squares"):
        torch.testing.assert_close(getattr(total, key), getattr(once, key))
    # the shared variance agrees with the mixture module's direct computation on the rows
    means = once.means()
    torch.testing.assert_close(total.shared_variance(), mixture.shared_variance(X, z, means))
    torch.testing.assert_close(total.shared_variance(covariance="spherical"),
                               mixture.shared_variance(X, z, means, covariance="spherical"))
    other = torch.nn.functional.normalize(torch.randn(4, 6, dtype=torch.float64), dim=1)
    torch.testing.assert_close(total.shared_variance(other), mixture.shared_variance(X, z, other))


def test_forgetting_weights_batches_geometrically():
    gamma = 0.7
    batches = [_batch(s) for s in range(4)]
    state = ClassStatistics.zeros(4, 6, dtype=torch.float64)
    for X, z in batches:
        state = state.scaled(gamma) + ClassStatistics.of(X, z)
    # the same as one pass with row weights gamma**(T - 1 - t)
    X = torch.cat([b[0] for b in batches])
    z = torch.cat([b[1] * gamma ** (len(batches) - 1 - t) for t, b in enumerate(batches)])
    once = ClassStatistics.of(X, z)
    torch.testing.assert_close(state.sums, once.sums)
    torch.testing.assert_close(state.counts, once.counts)
    # scaling leaves means and variances unchanged
    torch.testing.assert_close(state.scaled(0.3).means(), state.means())
    torch.testing.assert_close(state.scaled(0.3).variances(), state.variances())
    assert float(state.scaled(0.0).counts.sum()) == 0.0


@pytest.mark.parametrize("factor", [-0.1, float("nan"), float("inf")])
def test_bad_factor(factor):
    with pytest.raises(ValueError, match="factor"):
        ClassStatistics.zeros(2, 3).scaled(factor)


def test_absent_class_has_zero_mean_and_variance():
    X, z = _batch(0, c=3)
    z[:, 2] = 0
    stats = ClassStatistics.of(X, z)
    assert float(stats.counts[2]) == 0
    assert torch.all(stats.means()[2] == 0) and torch.all(stats.variances()[2] == 0)
    assert torch.isfinite(stats.resultant_lengths()).all()


def test_one_image_d1_c1():
    stats = ClassStatistics.of(torch.tensor([[1.0]]), torch.tensor([[1.0]]))
    assert stats.n_classes == 1 and stats.dim == 1
    assert float(stats.means()) == 1.0 and float(stats.variances()) == 0.0


def test_shape_errors():
    with pytest.raises(ValueError, match="same N"):
        ClassStatistics.of(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="cannot add"):
        ClassStatistics.zeros(2, 3) + ClassStatistics.zeros(2, 4)
    with pytest.raises(ValueError, match="expected counts"):
        ClassStatistics(torch.zeros(2), torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="n_classes"):
        ClassStatistics.zeros(0, 3)


def test_dict_round_trip_and_bad_dicts(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    X, z = _batch(5)
    stats = ClassStatistics.of(X, z)
    path = tmp_path / "s.safetensors"
    safetensors.save_file(stats.to_dict("prior."), str(path))
    back = ClassStatistics.from_dict(safetensors.load_file(str(path)), "prior.", where=str(path))
    for key in ("counts", "sums", "squares"):
        torch.testing.assert_close(getattr(back, key), getattr(stats, key), rtol=0, atol=0)
    tensors = stats.to_dict()
    with pytest.raises(ValueError, match="missing tensor"):
        ClassStatistics.from_dict({"counts": tensors["counts"]}, where="f.safetensors")
    with pytest.raises(ValueError, match="f.safetensors: .*expected counts"):
        ClassStatistics.from_dict({**tensors, "counts": torch.zeros(7, dtype=torch.float64)}, where="f.safetensors")
    bad = dict(tensors, sums=tensors["sums"].clone())
    bad["sums"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ClassStatistics.from_dict(bad)
    with pytest.raises(ValueError, match="negative"):
        ClassStatistics.from_dict(dict(tensors, counts=-tensors["counts"]))


def test_scaled_per_class_against_rows_weighted_directly():
    gen = torch.Generator().manual_seed(1)
    X, z = torch.randn(20, 3, generator=gen, dtype=torch.float64), torch.rand(20, 4, generator=gen, dtype=torch.float64)
    factors = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    scaled = ClassStatistics.of(X, z).scaled_per_class(factors)
    direct = ClassStatistics.of(X, z * factors)  # the same as weighting each image's assignment
    for key in ("counts", "sums", "squares"):
        torch.testing.assert_close(getattr(scaled, key), getattr(direct, key))
    for bad in (torch.ones(3), torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.tensor([1.0, float("nan"), 1.0, 1.0])):
        with pytest.raises(ValueError, match="scaled_per_class"):
            ClassStatistics.of(X, z).scaled_per_class(bad)


def test_in_place_forgetting_and_labelled_rows_against_the_dense_statistics():
    """scale_ then add_rows_ (a stream's commit) against scaled() + of() with the one-hot z."""
    gen = torch.Generator().manual_seed(2)
    X0, z0 = torch.randn(15, 5, generator=gen, dtype=torch.float64), torch.rand(15, 6, generator=gen, dtype=torch.float64)
    X = torch.randn(9, 5, generator=gen, dtype=torch.float32)  # float32 rows into a float64 state
    labels = torch.tensor([0, 3, 3, 5, 0, 1, 3, 5, 5])
    weights = torch.rand(9, generator=gen)
    weights[2] = 0.0  # a row the state leaves out
    one_hot = torch.zeros(9, 6, dtype=torch.float64)
    one_hot[torch.arange(9), labels] = weights.double()
    expected = ClassStatistics.of(X0, z0).scaled(0.7) + ClassStatistics.of(X.double(), one_hot)
    for by_product in (False, True):  # the CPU's way and the other devices' way
        state = ClassStatistics.of(X0, z0)
        sums_before = state.sums
        assert state.scale_(0.7).add_rows_(X, labels, weights, by_product=by_product) is state
        assert state.sums is sums_before  # in place: no (C, d) copy
        for key in ("counts", "sums", "squares"):
            torch.testing.assert_close(getattr(state, key), getattr(expected, key), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="add_rows_"):
        state.add_rows_(X[:, :4], labels, weights)
    with pytest.raises(ValueError, match="scale_"):
        state.scale_(float("nan"))
