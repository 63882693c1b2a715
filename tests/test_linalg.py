"""Identities of rankserve.linalg, checked in float64 with tight tolerances on small random matrices."""

from __future__ import annotations

import pytest
import torch

from rankserve.linalg import (
    asvd_expansion,
    asvd_scaled_svd,
    fisher_expansion,
    fisher_weighted_svd,
    kfac_truncation_loss,
    lstsq_update_u,
    shared_basis_expansion,
    shared_basis_svd,
    svd_expansion,
    svd_spectrum,
    truncated_svd,
    whitened_expansion,
    whitened_spectrum,
    whitened_svd,
    whitening_factor,
)

F64 = torch.float64
SHAPES = [(24, 40), (40, 24)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def calib(n: int, tokens: int, seed: int = 1) -> torch.Tensor:
    """Calibration inputs X [tokens, n] with correlated, unevenly scaled channels (like activations)."""
    X = randn(tokens, n, seed=seed) @ randn(n, n, seed=seed + 100)
    return X * torch.logspace(-1, 1, n, dtype=F64)


def sq(t: torch.Tensor) -> float:
    return float((t.to(F64) ** 2).sum())


def rank_deficient_gram(n: int) -> torch.Tensor:
    """X with fewer rows than columns and a dead (all-zero) input channel."""
    X = calib(n, n // 3)
    X[:, 3] = 0
    return X.T @ X


# ---------------------------------------------------------------------------------------------- plain SVD


@pytest.mark.parametrize("shape", SHAPES)
def test_truncated_svd_tail_identity_and_full_rank(shape):
    W = randn(*shape)
    sig = svd_spectrum(W, dtype=F64)
    assert torch.allclose(sig, torch.linalg.svdvals(W), rtol=1e-12)
    k = min(shape)
    for r in (1, 5, k // 2, k - 1):
        U, V = truncated_svd(W, r, dtype=F64)
        assert U.shape == (shape[0], r) and V.shape == (r, shape[1])
        assert sq(W - U @ V) == pytest.approx(sq(sig[r:]), rel=1e-10)
        # sqrt(Sigma) split evenly: both factors carry the same column/row norms
        assert torch.allclose(U.norm(dim=0), V.norm(dim=1), rtol=1e-10)
    U, V = truncated_svd(W, k, dtype=F64)
    assert torch.allclose(U @ V, W, atol=1e-12)


def test_default_output_is_float32_on_input_device():
    W = randn(24, 40).float()
    U, V = truncated_svd(W, 4)
    assert U.dtype == V.dtype == torch.float32 and U.device == W.device
    assert svd_spectrum(W).dtype == torch.float32


@pytest.mark.parametrize("rank", [0, 25, -1])
def test_bad_rank_raises(rank):
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(randn(24, 40), rank)


# ---------------------------------------------------------------------------------------------- whitening


def test_whitening_factor_full_rank_is_plain_cholesky():
    X = calib(40, 200)
    G = X.T @ X
    S, method = whitening_factor(G)
    assert method == "cholesky"
    assert S.dtype == F64  # fp64 in -> fp64 out
    assert torch.equal(S, S.tril())
    assert torch.allclose(S @ S.T, G, rtol=1e-10, atol=1e-10 * float(G.diagonal().mean()))
    S32, _ = whitening_factor(G.float())
    assert S32.dtype == torch.float32


def test_whitening_factor_rank_deficient_shifts():
    G = rank_deficient_gram(40)
    S, method = whitening_factor(G)
    assert method.startswith("cholesky+shift(")
    eps = float(method[len("cholesky+shift(") : -1])
    assert 0 < eps <= 1e-3 * float(G.diagonal().mean())
    assert torch.isfinite(S).all()
    assert torch.equal(S, S.tril())
    # S S^T = G + shift * I; the method string carries the shift to 3 significant digits
    D = S @ S.T - G
    shift = float(D.diagonal().mean())
    assert shift == pytest.approx(eps, rel=1e-2)
    assert torch.allclose(D, shift * torch.eye(40, dtype=F64), atol=1e-9 * float(G.diagonal().max()))


def test_whitening_factor_rounding_level_pivot_is_not_accepted():
    # PD, so a raw fp64 Cholesky succeeds, but its last pivot is at rounding level (cond ~ 1e14)
    G = randn(6, 6, seed=8)
    G = G @ G.T
    G[-1, :] = G[-2, :]
    G[:, -1] = G[:, -2]
    G[-1, -1] += 1e-14 * float(G.diagonal().mean())
    assert int(torch.linalg.cholesky_ex(G).info) == 0
    S, method = whitening_factor(G)
    assert method.startswith("cholesky+shift(")
    assert float(S.diagonal().min()) ** 2 > 1e-7 * float(G.diagonal().mean())


def test_whitening_factor_indefinite_uses_eigh():
    G = torch.diag(torch.tensor([4.0, 1.0, -3.0, 2.0], dtype=F64))
    S, method = whitening_factor(G)
    assert method == "eigh"
    assert torch.isfinite(S).all()
    lam = torch.linalg.eigvalsh(S @ S.T)
    assert float(lam.min()) > 0


def test_whitening_factor_zero_gram_and_nonfinite():
    S, method = whitening_factor(torch.zeros(5, 5, dtype=F64))
    assert method.startswith("cholesky+shift") and torch.isfinite(S).all()
    with pytest.raises(ValueError, match="NaN"):
        whitening_factor(torch.full((3, 3), float("nan")))


@pytest.mark.parametrize("shape", SHAPES)
def test_whitened_svd_tail_identity(shape):
    m, n = shape
    W = randn(m, n)
    X = calib(n, 300)
    S, method = whitening_factor(X.T @ X)
    assert method == "cholesky"
    sig = whitened_spectrum(W, S, dtype=F64)
    assert torch.allclose(sig, torch.linalg.svdvals(W @ S), rtol=1e-12)
    k = min(shape)
    for r in (1, 4, k // 2, k - 1):
        U, V = whitened_svd(W, S, r, dtype=F64)
        # rows of X are tokens: the layer output error is (W - UV) X^T
        assert sq((W - U @ V) @ X.T) == pytest.approx(sq(sig[r:]), rel=1e-9)
        # and it beats plain SVD in the data metric
        Up, Vp = truncated_svd(W, r, dtype=F64)
        assert sq((W - U @ V) @ X.T) <= sq((W - Up @ Vp) @ X.T) * (1 + 1e-12)
    U, V = whitened_svd(W, S, k, dtype=F64)
    assert torch.allclose(U @ V, W, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_whitened_svd_rank_deficient_and_eigh_factor(shape):
    m, n = shape
    W = randn(m, n)
    # shifted Cholesky: identity holds in the metric S S^T that was actually factored
    S, method = whitening_factor(rank_deficient_gram(n))
    assert method.startswith("cholesky+shift")
    sig = whitened_spectrum(W, S, dtype=F64)
    U, V = whitened_svd(W, S, 6, dtype=F64)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    assert sq((W - U @ V) @ S) == pytest.approx(sq(sig[6:]), rel=1e-8)
    # non-triangular (eigh) factor goes through the general solve
    G = calib(n, 300)
    G = G.T @ G
    lam, Q = torch.linalg.eigh(G)
    S_e = Q * lam.sqrt()
    assert not torch.equal(S_e, S_e.tril())
    U, V = whitened_svd(W, S_e, 6, dtype=F64)
    sig = torch.linalg.svdvals(W @ S_e)
    assert sq((W - U @ V) @ S_e) == pytest.approx(sq(sig[6:]), rel=1e-8)
    U, V = whitened_svd(W, S_e, min(shape), dtype=F64)
    assert torch.allclose(U @ V, W, atol=1e-8)


# ---------------------------------------------------------------------------------------------- U update


@pytest.mark.parametrize("shape", SHAPES)
def test_lstsq_update_u_never_increases_error(shape):
    m, n = shape
    W = randn(m, n)
    X = calib(n, 300)
    G = X.T @ X
    for r in (2, 7):
        # from a data-blind V the update strictly helps
        U0, V0 = truncated_svd(W, r, dtype=F64)
        U1 = lstsq_update_u(W, V0, G, dtype=F64)
        e0, e1 = sq((W - U0 @ V0) @ X.T), sq((W - U1 @ V0) @ X.T)
        assert e1 <= e0 * (1 + 1e-12)
        assert e1 < e0 * 0.999
        # closed form: U = W G V^T (V G V^T)^-1
        ref = torch.linalg.solve(V0 @ G @ V0.T, V0 @ G @ W.T).T
        assert torch.allclose(U1, ref, rtol=1e-8, atol=1e-10)
        # from the whitened optimum it is a fixed point
        S, _ = whitening_factor(G)
        Uw, Vw = whitened_svd(W, S, r, dtype=F64)
        Uw1 = lstsq_update_u(W, Vw, G, dtype=F64)
        ew, ew1 = sq((W - Uw @ Vw) @ X.T), sq((W - Uw1 @ Vw) @ X.T)
        assert ew1 <= ew * (1 + 1e-9)
        assert ew1 == pytest.approx(ew, rel=1e-9)


def test_lstsq_update_u_rank_deficient_gram():
    W = randn(24, 40)
    X = calib(40, 12)
    X[:, 3] = 0
    G = X.T @ X
    U0, V0 = truncated_svd(W, 16, dtype=F64)  # r=16 > 12 tokens: V G V^T is singular
    U1 = lstsq_update_u(W, V0, G, dtype=F64)
    assert torch.isfinite(U1).all()
    assert sq((W - U1 @ V0) @ X.T) <= sq((W - U0 @ V0) @ X.T) * (1 + 1e-9)
    # a V row that sees no data at all (only the dead channel) must not produce NaN either
    V_dead = torch.zeros(3, 40, dtype=F64)
    V_dead[0, 3] = 1.0
    V_dead[1:] = randn(2, 40, seed=5)
    assert torch.isfinite(lstsq_update_u(W, V_dead, G)).all()


# ---------------------------------------------------------------------------------------------- ASVD


@pytest.mark.parametrize("shape", SHAPES)
def test_asvd_scaled_svd(shape):
    m, n = shape
    W = randn(m, n)
    absmean = randn(n, seed=3).abs() + 0.1
    s = absmean**0.5
    U, V = asvd_scaled_svd(W, absmean, 5, dtype=F64)
    # error in the scaled metric is the tail of the scaled spectrum
    sig = torch.linalg.svdvals(W * s)
    assert sq((W - U @ V) * s) == pytest.approx(sq(sig[5:]), rel=1e-9)
    U, V = asvd_scaled_svd(W, absmean, min(shape), dtype=F64)
    assert torch.allclose(U @ V, W, atol=1e-10)
    # alpha = 0 is plain SVD
    U0, V0 = asvd_scaled_svd(W, absmean, 5, alpha=0.0, dtype=F64)
    Up, Vp = truncated_svd(W, 5, dtype=F64)
    assert torch.allclose(U0 @ V0, Up @ Vp, atol=1e-10)


def test_asvd_zero_channel_is_finite():
    W = randn(24, 40)
    absmean = randn(40, seed=3).abs()
    absmean[[0, 7]] = 0
    U, V = asvd_scaled_svd(W, absmean, 6)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    U, V = asvd_scaled_svd(W, torch.zeros(40), 6)  # no activations at all: plain SVD
    assert torch.isfinite(U).all() and torch.isfinite(V).all()


# ---------------------------------------------------------------------------------------------- FWSVD


@pytest.mark.parametrize("shape", SHAPES)
def test_fisher_weighted_svd(shape):
    m, n = shape
    W = randn(m, n)
    imp = randn(m, seed=4) ** 2 + 0.01
    w = imp.sqrt()[:, None]
    U, V = fisher_weighted_svd(W, imp, 5, dtype=F64)
    assert U.shape == (m, 5) and V.shape == (5, n)
    sig = torch.linalg.svdvals(w * W)
    assert sq(w * (W - U @ V)) == pytest.approx(sq(sig[5:]), rel=1e-9)
    U, V = fisher_weighted_svd(W, imp, min(shape), dtype=F64)
    assert torch.allclose(U @ V, W, atol=1e-10)
    # uniform importance is plain SVD
    U1, V1 = fisher_weighted_svd(W, torch.full((m,), 3.0, dtype=F64), 5, dtype=F64)
    Up, Vp = truncated_svd(W, 5, dtype=F64)
    assert torch.allclose(U1 @ V1, Up @ Vp, atol=1e-10)


def test_fisher_weighted_svd_zero_rows_finite():
    W = randn(24, 40)
    imp = torch.rand(24, generator=gen(2), dtype=F64)
    imp[:5] = 0
    U, V = fisher_weighted_svd(W, imp, 6)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    with pytest.raises(ValueError, match="row_importance"):
        fisher_weighted_svd(W, torch.ones(40), 6)  # per-OUTPUT-row, not per input


# ---------------------------------------------------------------------------------------------- basis sharing


def test_shared_basis_full_rank_and_tail():
    n = 40
    Ws = [randn(24, n, seed=10), randn(16, n, seed=11), randn(8, n, seed=12)]
    X = calib(n, 300)
    S, _ = whitening_factor(X.T @ X)
    for Smat in (None, S):
        basis, coeffs = shared_basis_svd(Ws, Smat, n, dtype=F64)  # full rank = min(48, 40)
        assert basis.shape == (n, n)
        assert [c.shape for c in coeffs] == [(24, n), (16, n), (8, n)]
        for Wi, Ci in zip(Ws, coeffs, strict=True):
            assert torch.allclose(Ci @ basis, Wi, atol=1e-9)
    W_cat = torch.cat(Ws)
    for r in (3, 17):
        basis, coeffs = shared_basis_svd(Ws, S, r, dtype=F64)
        assert basis.shape == (r, n)
        sig = torch.linalg.svdvals(W_cat @ S)
        err = sum(sq((Wi - Ci @ basis) @ X.T) for Wi, Ci in zip(Ws, coeffs, strict=True))
        assert err == pytest.approx(sq(sig[r:]), rel=1e-9)
        basis, coeffs = shared_basis_svd(Ws, None, r, dtype=F64)
        sig = torch.linalg.svdvals(W_cat)
        err = sum(sq(Wi - Ci @ basis) for Wi, Ci in zip(Ws, coeffs, strict=True))
        assert err == pytest.approx(sq(sig[r:]), rel=1e-9)


def test_shared_basis_single_matches_whitened_svd_and_validates():
    W = randn(24, 40)
    S, _ = whitening_factor(rank_deficient_gram(40))
    basis, (coeff,) = shared_basis_svd([W], S, 6, dtype=F64)
    U, V = whitened_svd(W, S, 6, dtype=F64)
    assert torch.isfinite(basis).all()
    assert torch.allclose(coeff @ basis, U @ V, atol=1e-8)
    with pytest.raises(ValueError):
        shared_basis_svd([W, randn(24, 30)], None, 4)
    with pytest.raises(ValueError):
        shared_basis_svd([], None, 4)


# ---------------------------------------------------------------------------------------------- loss-driven ranks


def _psd(n: int, seed: int) -> torch.Tensor:
    A = randn(n, 2 * n, seed=seed)
    return A @ A.T / (2 * n)


@pytest.mark.parametrize("out,inp", SHAPES)
def test_every_expansion_is_exact_at_full_rank(out, inp):
    W = randn(out, inp, seed=3)
    X = calib(inp, 3 * inp)
    S, _ = whitening_factor(X.T @ X)
    exps = [
        svd_expansion(W),
        whitened_expansion(W, S),
        asvd_expansion(W, X.abs().mean(0), 0.5),
        fisher_expansion(W, torch.rand(out, generator=gen(4), dtype=F64) + 0.1),
    ]
    for e in exps:
        torch.testing.assert_close(e.left * e.s @ e.right, W, rtol=1e-9, atol=1e-9)
        assert bool((e.s[:-1] >= e.s[1:]).all())
    members = shared_basis_expansion([W, randn(16, inp, seed=5)], S)
    assert [m.left.shape[0] for m in members] == [out, 16]
    torch.testing.assert_close(members[0].left * members[0].s @ members[0].right, W, rtol=1e-9, atol=1e-9)


def _direct_loss(W: torch.Tensor, Wr: torch.Tensor, X: torch.Tensor, G: torch.Tensor) -> float:
    dW = W - Wr
    return 0.5 * float(torch.trace(dW @ X @ dW.T @ G))


def test_kfac_truncation_loss_matches_the_truncated_factorizations():
    out, inp = 20, 28
    W = randn(out, inp, seed=6)
    X, G = _psd(inp, 7), _psd(out, 8)
    S, _ = whitening_factor(X)
    est = kfac_truncation_loss([whitened_expansion(W, S)], [X], [G])
    k = min(out, inp)
    assert est.shape == (k + 1,) and est[k] == 0
    assert est[0] == pytest.approx(_direct_loss(W, 0 * W, X, G), rel=1e-9)
    for r in range(1, k):
        U, V = whitened_svd(W, S, r, dtype=F64)  # the family's own truncation
        assert est[r] == pytest.approx(_direct_loss(W, U @ V, X, G), rel=1e-8, abs=1e-12)
    # plain SVD: its terms are not orthogonal in the data metric, so the cross terms count too
    est = kfac_truncation_loss([svd_expansion(W)], [X], [G])
    for r in (1, 7, 15):
        U, V = truncated_svd(W, r, dtype=F64)
        assert est[r] == pytest.approx(_direct_loss(W, U @ V, X, G), rel=1e-8)


def test_kfac_truncation_loss_of_a_shared_basis_sums_its_members():
    inp = 24
    Ws = [randn(12, inp, seed=9), randn(16, inp, seed=10)]
    Xs, Gs = [_psd(inp, 11), _psd(inp, 12)], [_psd(12, 13), _psd(16, 14)]
    S, _ = whitening_factor(Xs[0] + Xs[1])
    est = kfac_truncation_loss(shared_basis_expansion(Ws, S), Xs, Gs)
    for r in (1, 5, 17):
        basis, coeffs = shared_basis_svd(Ws, S, r, dtype=F64)
        direct = sum(_direct_loss(W, c @ basis, X, G) for W, c, X, G in zip(Ws, coeffs, Xs, Gs, strict=True))
        assert est[r] == pytest.approx(direct, rel=1e-8)
    with pytest.raises(ValueError, match="G must be"):
        kfac_truncation_loss(shared_basis_expansion(Ws, S), Xs, [Gs[1], Gs[0]])
