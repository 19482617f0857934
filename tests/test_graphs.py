"""graphs/: exact kNN against brute force (and keops against torch), sparse assembly against a dense
build, and block conjugate gradient against scipy's direct sparse solve."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch

from zsadapt.graphs import (EdgeList, chebyshev, chebyshev_iterations, conjugate_gradient, keops_available, knn,
                            symmetric_normalise)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))


def _brute_force(query, base, k, exclude_self=False):
    sims = (query.double() @ base.double().T).numpy()
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_torch_matches_brute_force(chunk, exclude_self):
    rng = np.random.default_rng(0)
    base = _unit(rng, 123, 16)
    query = base if exclude_self else _unit(rng, 37, 16)
    sims, idx = knn(query, base, 6, exclude_self=exclude_self, chunk=chunk)
    ref_sims, ref_idx = _brute_force(query, base, 6, exclude_self)
    assert sims.shape == idx.shape == (query.shape[0], 6)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(sims.numpy(), ref_sims, rtol=1e-5, atol=1e-6)
    assert bool((sims[:, :-1] >= sims[:, 1:]).all()), "rows sorted by decreasing similarity"


@pytest.mark.parametrize("n, d, k, min_rows", [(1, 4, 1, 1), (2, 3, 1, 1), (9, 4, 1, 1), (123, 16, 6, 1),
                                              (1000, 32, 10, 1), (300, 1, 5, 1), (2500, 8, 10, None)])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_self_search_from_half_the_product_matches_brute_force(n, d, k, min_rows, exclude_self, monkeypatch):
    """knn(X, X) computes only the strips on and above the diagonal (graphs/knn.py; for small pools
    only when SELF_MIN_ROWS is lowered): the same similarities as the full double-precision
    product, and the same neighbours where no two similarities of a row tie (d = 1 ties
    everywhere: there only the similarities must agree)."""
    import sys
    module = sys.modules["zsadapt.graphs.knn"]
    if min_rows is not None:
        monkeypatch.setattr(module, "SELF_MIN_ROWS", min_rows)
    assert n >= module.SELF_MIN_ROWS and k <= module._self_strip(n), "the case must take the half-product path"
    base = _unit(np.random.default_rng(n), n, d)
    if exclude_self and k >= n:
        k = n - 1
    if k < 1:  # a pool of one image has no other image: a clear error, not an empty list
        with pytest.raises(ValueError, match="k = 0"):
            knn(base, base, k, exclude_self=True)
        return
    sims, idx = knn(base, base, k, exclude_self=exclude_self)
    ref_sims, ref_idx = _brute_force(base, base, k, exclude_self)
    np.testing.assert_allclose(sims.numpy(), ref_sims, rtol=1e-5, atol=1e-6)
    if d > 1:
        np.testing.assert_array_equal(idx.numpy(), ref_idx)
    got = (base[:, None, :] * base[idx]).sum(-1)  # the returned neighbours have the returned similarities
    np.testing.assert_allclose(got.numpy(), sims.numpy(), rtol=1e-5, atol=1e-6)
    if exclude_self:
        assert not bool((idx == torch.arange(n)[:, None]).any())


def test_knn_includes_self_unless_excluded():
    base = _unit(np.random.default_rng(1), 50, 8)
    _, idx = knn(base, base, 3)
    assert bool((idx[:, 0] == torch.arange(50)).all())
    _, idx = knn(base, base, 3, exclude_self=True)
    assert not bool((idx == torch.arange(50)[:, None]).any())


@pytest.mark.parametrize(
    "k, kwargs, message",
    [(0, {}, "k = 0"), (11, {}, "k = 11"), (10, {"exclude_self": True}, "k = 10"), (2, {"backend": "faiss"}, "backend")],
)
def test_knn_rejects_bad_arguments(k, kwargs, message):
    base = _unit(np.random.default_rng(2), 10, 4)
    with pytest.raises(ValueError, match=message):
        knn(base, base, k, **kwargs)


@pytest.mark.keops
@pytest.mark.skipif(not keops_available(), reason="pykeops is not installed")
@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_keops_matches_torch(exclude_self):
    rng = np.random.default_rng(3)
    base = _unit(rng, 300, 8)
    query = base if exclude_self else _unit(rng, 40, 8)
    sims_t, idx_t = knn(query, base, 5, exclude_self=exclude_self, backend="torch")
    sims_k, idx_k = knn(query, base, 5, exclude_self=exclude_self, backend="keops")
    np.testing.assert_array_equal(idx_k.numpy(), idx_t.numpy())
    np.testing.assert_allclose(sims_k.numpy(), sims_t.numpy(), rtol=1e-5, atol=1e-6)


def test_edge_list_symmetrise_normalise_matches_dense():
    rows = torch.tensor([0, 0, 1, 2, 2, 3])
    cols = torch.tensor([1, 1, 2, 2, 0, 1])  # a repeated edge (0, 1) and a self-loop (2, 2)
    vals = torch.tensor([0.5, 0.25, 1.0, 3.0, 2.0, 0.5], dtype=torch.float64)
    w = EdgeList(rows, cols, vals, 5)  # node 4 is isolated
    wn = symmetric_normalise(w.symmetrised().without_diagonal().coalesced())
    dense = np.zeros((5, 5))
    np.add.at(dense, (rows.numpy(), cols.numpy()), vals.numpy())
    dense = dense + dense.T
    np.fill_diagonal(dense, 0)
    degree = dense.sum(1)
    degree[degree == 0] = 1
    expected = dense / np.sqrt(np.outer(degree, degree))
    np.testing.assert_allclose(wn.to_dense().numpy(), expected)
    np.testing.assert_allclose(wn.to_csr().to_dense().numpy(), expected)


def _spd_system(n=60, m=5, seed=0):
    """L = I - 0.9 Wn for a random sparse graph (symmetric positive definite), and m RHS."""
    rng = np.random.default_rng(seed)
    a = scipy.sparse.random(n, n, density=0.08, random_state=seed, format="csr")
    a = a + a.T
    d = np.asarray(a.sum(1)).ravel()
    d[d == 0] = 1
    dm = scipy.sparse.diags(1 / np.sqrt(d))
    L = (scipy.sparse.eye(n) - 0.9 * dm @ a @ dm).tocsc()
    b = rng.standard_normal((n, m))
    return L, b


def test_block_cg_matches_scipy_direct_solve():
    L, b = _spd_system()
    b[:, 2] = 0.0  # a zero right-hand side converges at once to x = 0
    expected = scipy.sparse.linalg.spsolve(L, b)
    L_t = torch.from_numpy(L.toarray())
    x, info = conjugate_gradient(lambda p: L_t @ p, torch.from_numpy(b), tol=1e-10, max_iter=500)
    assert info.converged and info.max_relative_residual <= 1e-10
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-7, atol=1e-9)
    assert bool((x[:, 2] == 0).all())


def test_block_cg_columns_converge_independently():
    """Each column's iterates are those of a single-vector CG on that column alone."""
    L, b = _spd_system(seed=1)
    L_t = torch.from_numpy(L.toarray())
    x_block, _ = conjugate_gradient(lambda p: L_t @ p, torch.from_numpy(b), tol=1e-6, max_iter=7)
    for j in range(b.shape[1]):
        x_single, _ = conjugate_gradient(lambda p: L_t @ p, torch.from_numpy(b[:, j]), tol=1e-6, max_iter=7)
        np.testing.assert_allclose(x_block[:, j].numpy(), x_single.numpy(), rtol=1e-10, atol=1e-12)


def test_block_cg_reports_non_convergence():
    L, b = _spd_system(seed=2)
    L_t = torch.from_numpy(L.toarray())
    _, info = conjugate_gradient(lambda p: L_t @ p, torch.from_numpy(b), tol=1e-12, max_iter=2)
    assert not info.converged and info.iterations == 2 and info.max_relative_residual > 1e-12


def test_block_cg_with_sparse_torch_operator_and_start_point():
    L, b = _spd_system(seed=4)
    coo = L.tocoo()
    L_csr = EdgeList(torch.from_numpy(coo.row).long(), torch.from_numpy(coo.col).long(),
                     torch.from_numpy(coo.data), L.shape[0]).coalesced().to_csr()
    expected = scipy.sparse.linalg.spsolve(L, b)
    x0 = torch.from_numpy(expected + 1e-3)
    x, info = conjugate_gradient(lambda p: L_csr @ p, torch.from_numpy(b), tol=1e-10, max_iter=200, x0=x0)
    assert info.converged
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-7, atol=1e-9)


def test_chebyshev_matches_scipy_direct_solve_within_its_bound():
    """L = I - 0.9 Wn has its spectrum in [0.1, 1.9]: the Chebyshev iteration on that interval
    reaches tol by the a-priori step count (checked against a direct solve)."""
    L, b = _spd_system(seed=5)
    expected = scipy.sparse.linalg.spsolve(L, b)
    L_t = torch.from_numpy(L.toarray())
    x, info = chebyshev(lambda p: L_t @ p, torch.from_numpy(b), low=0.1, high=1.9, tol=1e-10, max_iter=500)
    assert info.converged and info.max_relative_residual <= 1e-10
    assert info.iterations <= chebyshev_iterations(0.1, 1.9, 1e-10)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-7, atol=1e-9)
    residual = np.linalg.norm(b - L @ x.numpy(), axis=0) / np.linalg.norm(b, axis=0)
    assert residual.max() == pytest.approx(info.max_relative_residual, rel=1e-3)


def test_chebyshev_in_column_blocks_matches_one_block(monkeypatch):
    """On CPU the columns are solved in cache-sized blocks (each stopping on its own): the same
    solution as one block, against a direct solve, and the worst block's report."""
    import importlib

    cg_module = importlib.import_module("zsadapt.graphs.cg")
    L, b = _spd_system(m=7, seed=8)
    assert cg_module.CPU_BLOCK_ELEMENTS // L.shape[0] >= 7  # by default one block here
    b[:, 3] *= 1e-3  # a column far smaller than the rest: its block still meets tol relative to it
    L_t, b_t = torch.from_numpy(L.toarray()).to_sparse_csr(), torch.from_numpy(b)  # zlap's sparse matvec
    calls = []
    whole, whole_info = chebyshev(lambda p: calls.append(p.shape[1]) or L_t @ p, b_t, low=0.1, high=1.9,
                                  tol=1e-10, max_iter=500)
    assert set(calls) == {7}
    monkeypatch.setattr(cg_module, "CPU_BLOCK_ELEMENTS", 2 * L.shape[0])  # blocks of 2 columns
    calls.clear()
    blocked, info = chebyshev(lambda p: calls.append(p.shape[1]) or L_t @ p, b_t, low=0.1, high=1.9,
                              tol=1e-10, max_iter=500)
    assert set(calls) == {2, 1}  # 2 + 2 + 2 + 1 columns
    calls.clear()
    explicit, _ = chebyshev(lambda p: calls.append(p.shape[1]) or L_t @ p, b_t, low=0.1, high=1.9,
                            tol=1e-10, max_iter=500, column_block=3)
    assert set(calls) == {3, 1} and torch.equal(explicit, whole)
    with pytest.raises(ValueError, match="column_block"):
        chebyshev(lambda p: p, b_t, low=0.1, high=1.9, column_block=0)
    np.testing.assert_allclose(blocked.numpy(), scipy.sparse.linalg.spsolve(L, b), rtol=1e-7, atol=1e-9)
    assert torch.equal(blocked, whole)
    assert info.converged and info.iterations == whole_info.iterations
    assert info.max_relative_residual == pytest.approx(whole_info.max_relative_residual)
    _, capped = chebyshev(lambda p: L_t @ p, b_t, low=0.1, high=1.9, tol=1e-12, max_iter=3)
    assert not capped.converged and capped.iterations == 3


def test_chebyshev_reports_non_convergence_and_bad_bounds():
    L, b = _spd_system(seed=6)
    L_t = torch.from_numpy(L.toarray())
    _, info = chebyshev(lambda p: L_t @ p, torch.from_numpy(b), low=0.1, high=1.9, tol=1e-12, max_iter=3)
    assert not info.converged and info.iterations == 3 and info.max_relative_residual > 1e-12
    with pytest.raises(ValueError, match="0 < low <= high"):
        chebyshev(lambda p: p, torch.ones(3, 1), low=0.0, high=1.0)
    x, info = chebyshev(lambda p: 2.0 * p, torch.ones(4, 2), low=2.0, high=2.0)  # A = 2 I: one exact step
    assert info.iterations == 1 and torch.allclose(x, torch.full((4, 2), 0.5))


@pytest.mark.parametrize("width", [1, 15, 16, 17, 196, 843])
def test_aligned_blocks_pad_rows_and_give_the_same_product(width):
    """graphs/blocks.py: rows start every multiple of 16 elements, and a product written into
    such a block equals the plain product bit for bit (the padding is only skipped over)."""
    from zsadapt.graphs.blocks import ROW_ALIGNMENT, aligned_empty

    rng = np.random.default_rng(width)
    a = torch.from_numpy(rng.standard_normal((33, 8)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((width, 8)).astype(np.float32))
    block = aligned_empty(33, width, dtype=torch.float32)
    assert block.shape == (33, width) and block.stride(0) % ROW_ALIGNMENT == 0 and block.stride(0) >= width
    torch.mm(a, b.T, out=block)
    assert torch.equal(block, a @ b.T)
    storage = torch.empty(40 * 1000)
    carved = aligned_empty(33, width, dtype=torch.float32, storage=storage)
    assert carved.data_ptr() == storage.data_ptr() and carved.shape == (33, width)


def _reference_unique_rows(x):
    unique, inverse = torch.unique(x, dim=0, return_inverse=True)
    return (x, None) if unique.shape[0] == x.shape[0] else (unique, inverse)


@pytest.mark.parametrize("case", ["distinct", "duplicates", "same_lead", "signed_zero", "one_column",
                                  "one_row", "float64_close", "float16"])
def test_unique_rows_matches_torch_unique(case):
    """unique_rows checks the first two entries before sorting whole rows: the answer must be
    torch.unique's in every case, rows that share their first entries but differ later included."""
    from zsadapt.graphs import unique_rows

    rng = np.random.default_rng(0)
    x = _unit(rng, 50, 6)
    if case == "duplicates":
        x = torch.cat([x, x[[3, 3, 17]]])
    elif case == "same_lead":  # equal first two entries, distinct rows
        x[:, :2] = 0.5
    elif case == "signed_zero":  # 0.0 and -0.0 are the same number: a duplicate for torch.unique
        x[:2] = torch.tensor([0.0, 0.6, 0.8, 0.0, 0.0, 0.0])
        x[1, 0] = -0.0
    elif case == "one_column":
        x = torch.tensor([[1.0], [-1.0], [1.0]])
    elif case == "one_row":
        x = x[:1]
    elif case == "float64_close":  # equal in float32, different in float64: distinct rows
        x = x.double()
        x[1] = x[0]
        x[1, 5] += 1e-12
    elif case == "float16":
        x = torch.cat([x, x[:2]]).half()
    unique, inverse = unique_rows(x)
    expected_unique, expected_inverse = _reference_unique_rows(x)
    assert torch.equal(unique, expected_unique)
    if expected_inverse is None:
        assert inverse is None and unique is x
    else:
        assert torch.equal(inverse, expected_inverse) and torch.equal(unique[inverse], x)
