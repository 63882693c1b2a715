"""Pure tensor math of SVD compression: no modules, no I/O, no model knowledge. Rank budgets and allocation
live in :mod:`rankserve.ranks`.

Conventions used everywhere in this module:

* A weight ``W`` is ``[out, in]`` (= ``[m, n]``, PyTorch ``nn.Linear`` layout), so ``y = W x``.
* A factorization returns ``U`` ``[out, r]`` and ``V`` ``[r, in]`` with ``sqrt(Sigma)`` folded into both
  sides, so ``W ~= U @ V`` and the two factors have comparable scale (better for fp16/bf16 storage).
* Calibration statistics are the input Gram matrix ``XtX = X^T X`` ``[in, in]`` where the rows of ``X``
  are the layer's input vectors (tokens).
* Every decomposition runs in float64; factors come back as float32 on the input's device (the caller
  casts to its storage dtype). The keyword-only ``dtype=`` of each function overrides that (tests use
  ``torch.float64`` to check identities tightly).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "truncated_svd",
    "svd_spectrum",
    "whitening_factor",
    "whitened_svd",
    "whitened_spectrum",
    "lstsq_update_u",
    "asvd_scaled_svd",
    "fisher_weighted_svd",
    "shared_basis_svd",
    "Expansion",
    "svd_expansion",
    "whitened_expansion",
    "asvd_expansion",
    "fisher_expansion",
    "shared_basis_expansion",
    "kfac_truncation_loss",
]

# A Cholesky "succeeds" in fp64 on a singular PSD matrix with rounding-level pivots (~1e-16 relative);
# S^-1 then blows up along the empty directions. Pivots below this (relative to mean(diag)) count as
# failure (pivots bound the smallest eigenvalue from above, so this rejects rounding-level singularity,
# not every ill-conditioned Gram).
_PIVOT_FLOOR_REL = 1e-12
# Diagonal shifts tried after a failed Cholesky: eps_rel * mean(diag) * 10**k for k in range(_SHIFT_TRIES).
_SHIFT_TRIES = 4
# ASVD / FWSVD scales are clamped to this fraction of their max so 1/s stays finite.
_SCALE_FLOOR_REL = 1e-6


# --------------------------------------------------------------------------------------------------
# helpers


def _f64(t: Tensor) -> Tensor:
    """float64 copy for linalg; MPS has no float64, so only there we fall back to the CPU."""
    if t.device.type == "mps":
        t = t.cpu()
    return t.detach().to(torch.float64)


def _out(t: Tensor, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return t.to(device=like.device, dtype=dtype)


def _check_matrix(W: Tensor, name: str = "W") -> None:
    if W.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [out, in] matrix, got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(W.shape)}")


def _check_rank(rank: int, limit: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= limit:
        raise ValueError(f"rank must be in [1, {limit}] (min(out, in)), got {rank}")
    return rank


def _check_gram(xtx: Tensor, n: int | None = None) -> None:
    if xtx.ndim != 2 or xtx.shape[0] != xtx.shape[1]:
        raise ValueError(f"XtX must be a square [in, in] matrix, got shape {tuple(xtx.shape)}")
    if n is not None and xtx.shape[0] != n:
        raise ValueError(f"XtX is {tuple(xtx.shape)} but W has in={n} columns")


def _split_sqrt(A: Tensor, s: Tensor, Bh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Keep the top ``rank`` triplets of ``A diag(s) Bh`` and fold sqrt(s) into both sides."""
    root = s[:rank].sqrt()
    return A[:, :rank] * root, root[:, None] * Bh[:rank]


class Expansion(NamedTuple):
    """``W = left @ diag(s) @ right``: a sum of ``k`` rank-one terms, most important first, so that a family
    truncated to rank r keeps exactly the first r terms (float64). Each family's factorization is one of these."""

    left: Tensor  # [out, k]
    s: Tensor  # [k], non-negative
    right: Tensor  # [k, in]

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """``U`` [out, r], ``V`` [r, in] of the first ``rank`` terms, sqrt(s) folded into both sides."""
        return _split_sqrt(self.left, self.s, self.right, rank)


def _is_lower_triangular(S: Tensor) -> bool:
    return not bool(torch.triu(S, diagonal=1).any())


def _right_solve(M: Tensor, S: Tensor) -> Tensor:
    """``M S^{-1}`` (solve ``Z S = M``): triangular solve when S is lower-triangular (Cholesky factor),
    general LU solve otherwise (eigh factor), least squares if S turns out singular."""
    if _is_lower_triangular(S):
        diag = torch.diagonal(S)
        if bool((diag != 0).all()):
            return torch.linalg.solve_triangular(S, M, upper=False, left=False)
    Z, info = torch.linalg.solve_ex(S, M, left=False)
    if int(info) == 0 and bool(torch.isfinite(Z).all()):
        return Z
    # Z S = M  <=>  S^T Z^T = M^T; minimum-norm least squares for a singular S.
    return torch.linalg.lstsq(S.mT, M.mT).solution.mT


def _spd_solve_right(B: Tensor, M: Tensor) -> Tensor:
    """``B M^{-1}`` for a symmetric PSD ``M`` [r, r]: Cholesky, then a growing tiny ridge, then an
    eigenvalue-clamped pseudo-inverse. A singular M only happens when some direction of V carries no
    calibration energy; the ridge picks the minimum-norm-ish answer there instead of NaN/inf."""
    M = 0.5 * (M + M.mT)
    r = M.shape[0]
    scale = float(torch.diagonal(M).abs().mean()) or 1.0
    eye = torch.eye(r, dtype=M.dtype, device=M.device)
    for k in range(5):
        ridge = 0.0 if k == 0 else scale * 1e-12 * 10 ** (k - 1)
        L, info = torch.linalg.cholesky_ex(M + ridge * eye)
        if int(info) == 0 and float(torch.diagonal(L).min()) ** 2 > _PIVOT_FLOOR_REL * scale:
            # B M^-1 = (M^-1 B^T)^T, M symmetric.
            return torch.cholesky_solve(B.mT, L).mT
    lam, Q = torch.linalg.eigh(M)
    keep = lam > _PIVOT_FLOOR_REL * max(float(lam.max()), 0.0)
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    return ((B @ Q) * inv) @ Q.mT


# --------------------------------------------------------------------------------------------------
# 1. plain SVD


def truncated_svd(W: Tensor, rank: int, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Plain truncated SVD: ``W = A Sigma B^T``, ``U = A_r sqrt(Sigma_r)``, ``V = sqrt(Sigma_r) B_r^T``.

    By Eckart-Young, ``||W - U V||_F^2 = sum_{i > r} sigma_i^2`` is the smallest possible for rank r.
    """
    _check_matrix(W)
    _check_rank(rank, min(W.shape))
    U, V = svd_expansion(W).factors(rank)
    return _out(U, W, dtype), _out(V, W, dtype)


def svd_expansion(W: Tensor) -> Expansion:
    """``W = A Sigma B^T`` (float64): the expansion plain SVD truncates."""
    _check_matrix(W)
    A, s, Bh = torch.linalg.svd(_f64(W), full_matrices=False)
    return Expansion(A, s, Bh)


def svd_spectrum(W: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Singular values of ``W`` (descending, length ``min(out, in)``), float32 on W's device."""
    _check_matrix(W)
    return _out(torch.linalg.svdvals(_f64(W)), W, dtype)


# --------------------------------------------------------------------------------------------------
# 2. SVD-LLM whitening


def whitening_factor(xtx: Tensor, *, eps_rel: float = 1e-6) -> tuple[Tensor, str]:
    """Factor ``S`` with ``S S^T = X^T X`` (SVD-LLM's whitening matrix), computed in float64.

    Returns ``(S, method)``:

    * ``"cholesky"``: ``S = chol(XtX)``, lower-triangular.
    * ``"cholesky+shift(<eps>)"``: XtX was not (numerically) positive definite, e.g. fewer calibration
      tokens than features or a dead input channel. We factor ``XtX + eps I`` with
      ``eps = eps_rel * mean(diag(XtX)) * 10**k``, k = 0..3 (so at most 1e-3 relative with the default),
      taking the first that works; ``<eps>`` is the absolute shift. The shift is a ridge: it adds
      ``eps * ||W - U V||_F^2`` to the objective, which pins directions no calibration token excites to
      plain reconstruction instead of leaving them arbitrary. Still lower-triangular.
    * ``"eigh"``: even the largest shift failed (XtX is indefinite, e.g. corrupted by low-precision
      accumulation). ``XtX = Q Lambda Q^T`` with eigenvalues clamped to ``eps_rel * mean(Lambda_+)``,
      ``S = Q sqrt(Lambda)``. Not triangular: :func:`whitened_svd` then uses a general solve.

    A Cholesky whose smallest pivot^2 is below ``1e-12 * mean(diag)`` counts as failed, because fp64
    "succeeds" on singular Grams with rounding-level pivots and ``S^-1`` would then explode. (Pivots only
    bound the smallest eigenvalue from above, so this catches numerically singular Grams, not every
    ill-conditioned one; a genuinely PD but ill-conditioned Gram is factored as is, like SVD-LLM does.)

    ``S`` is float64 if ``xtx`` is float64 (it is an intermediate fed back to :func:`whitened_svd`;
    rounding an ill-conditioned S to fp32 costs whitening accuracy), otherwise float32. Non-finite
    input raises ValueError rather than producing NaN.
    """
    _check_gram(xtx)
    if not bool(torch.isfinite(xtx).all()):
        raise ValueError("XtX contains NaN or inf; cannot build a whitening factor")
    if not eps_rel > 0:
        raise ValueError(f"eps_rel must be > 0, got {eps_rel}")
    out_dtype = torch.float64 if xtx.dtype == torch.float64 else torch.float32

    def done(S: Tensor, method: str) -> tuple[Tensor, str]:
        return S.to(device=xtx.device, dtype=out_dtype), method

    G = _f64(xtx)
    G = 0.5 * (G + G.mT)  # accumulated Grams are only symmetric up to rounding
    n = G.shape[0]
    mean_diag = float(torch.diagonal(G).mean())
    scale = mean_diag if mean_diag > 0 else 1.0  # all-zero Gram (no data): shifts become absolute
    eye = torch.eye(n, dtype=G.dtype, device=G.device)

    def try_chol(M: Tensor) -> Tensor | None:
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            return None
        if float(torch.diagonal(L).min()) ** 2 <= _PIVOT_FLOOR_REL * scale:
            return None
        return L

    L = try_chol(G)
    if L is not None:
        return done(L, "cholesky")
    for k in range(_SHIFT_TRIES):
        eps = eps_rel * scale * 10**k
        L = try_chol(G + eps * eye)
        if L is not None:
            return done(L, f"cholesky+shift({eps:.3g})")
    lam, Q = torch.linalg.eigh(G)
    pos = lam.clamp_min(0)
    floor = eps_rel * (float(pos.mean()) or 1.0)
    return done(Q * lam.clamp_min(floor).sqrt(), "eigh")


def whitened_expansion(W: Tensor, S: Tensor) -> Expansion:
    """``W = A Sigma (B^T S^{-1})`` from the SVD of ``W S`` (float64): the expansion SVD-LLM truncates."""
    _check_matrix(W)
    _check_gram(S, W.shape[1])
    W64 = _f64(W)
    S64 = _f64(S).to(W64.device)
    A, s, Bh = torch.linalg.svd(W64 @ S64, full_matrices=False)
    return Expansion(A, s, _right_solve(Bh, S64))


def whitened_svd(
    W: Tensor, S: Tensor, rank: int, *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """SVD-LLM truncation-aware whitening.

    With ``X^T X = S S^T``: ``||(W - U V) X^T||_F^2 = ||(W - U V) S||_F^2`` (rows of X are tokens),
    so the optimal rank-r approximation in the data metric comes from the SVD of ``W S = A Sigma B^T``:
    ``U = A_r sqrt(Sigma_r)``, ``V = sqrt(Sigma_r) B_r^T S^{-1}``, and the loss is exactly
    ``sum_{i > r} sigma_i(W S)^2``. ``S^{-1}`` is applied with ``solve_triangular`` when S is
    lower-triangular (Cholesky), a general solve otherwise (the "eigh" form of :func:`whitening_factor`).
    """
    _check_matrix(W)
    _check_gram(S, W.shape[1])
    _check_rank(rank, min(W.shape))
    U, V = whitened_expansion(W, S).factors(rank)
    return _out(U, W, dtype), _out(V, W, dtype)


def whitened_spectrum(W: Tensor, S: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Singular values of ``W S`` (the whitened spectrum whose tail is the data-weighted loss)."""
    _check_matrix(W)
    _check_gram(S, W.shape[1])
    W64 = _f64(W)
    return _out(torch.linalg.svdvals(W64 @ _f64(S).to(W64.device)), W, dtype)


# --------------------------------------------------------------------------------------------------
# 3. closed-form U update


def lstsq_update_u(W: Tensor, V: Tensor, xtx: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """SVD-LLM's closed-form "update U" step: for fixed ``V`` the minimiser of ``||(W - U V) X^T||_F^2``.

    Setting the gradient to zero gives ``U (V G V^T) = W G V^T`` with ``G = X^T X``, so
    ``U = W G V^T (V G V^T)^{-1}``. Solved by Cholesky on the r x r system; if it is singular (some
    direction of V sees no calibration energy) a tiny growing ridge (1e-12..1e-9 relative), then an
    eigen-clamped pseudo-inverse, keeps the answer finite. The normal equations are consistent for a
    PSD G, so the pseudo-inverse solution is still an exact minimiser.
    """
    _check_matrix(W)
    _check_matrix(V, "V")
    if V.shape[1] != W.shape[1]:
        raise ValueError(f"V is {tuple(V.shape)} but W has in={W.shape[1]} columns")
    _check_gram(xtx, W.shape[1])
    if not bool(torch.isfinite(xtx).all()):
        raise ValueError("XtX contains NaN or inf")
    W64 = _f64(W)
    V64 = _f64(V).to(W64.device)
    G = _f64(xtx).to(W64.device)
    G = 0.5 * (G + G.mT)
    VG = V64 @ G  # [r, in]
    U = _spd_solve_right(W64 @ VG.mT, VG @ V64.mT)
    return _out(U, W, dtype)


# --------------------------------------------------------------------------------------------------
# 4. ASVD


def asvd_channel_scale(act_absmean: Tensor, alpha: float) -> Tensor:
    """ASVD's input-channel scale ``s_j = mean|x_j|^alpha`` (float64), clamped below at ``1e-6 * max(s)`` so that
    dead channels stay invertible; all ones if every channel is dead. NaN/inf statistics count as 0."""
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    a = torch.nan_to_num(_f64(act_absmean), nan=0.0, posinf=0.0).abs()
    s = a**alpha
    smax = float(s.max())
    return s.clamp_min(_SCALE_FLOOR_REL * smax) if smax > 0 else torch.ones_like(s)


def asvd_scaled_svd(
    W: Tensor, act_absmean: Tensor, rank: int, alpha: float = 0.5, *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """ASVD (activation-aware SVD): scale input channels by activation magnitude before truncating.

    ``s`` = :func:`asvd_channel_scale`; SVD of ``W diag(s) = A Sigma B^T``; ``U = A_r sqrt(Sigma_r)``,
    ``V = sqrt(Sigma_r) B_r^T diag(1/s)``, so ``U V ~= W`` with errors pushed onto low-activation input channels.
    """
    _check_rank(rank, min(W.shape))
    U, V = asvd_expansion(W, act_absmean, alpha).factors(rank)
    return _out(U, W, dtype), _out(V, W, dtype)


def asvd_expansion(W: Tensor, act_absmean: Tensor, alpha: float = 0.5) -> Expansion:
    """``W = A Sigma (B^T diag(1/s))`` from the SVD of ``W diag(s)`` (float64): the expansion ASVD truncates."""
    _check_matrix(W)
    if act_absmean.shape != (W.shape[1],):
        raise ValueError(f"act_absmean must have shape ({W.shape[1]},), got {tuple(act_absmean.shape)}")
    W64 = _f64(W)
    s = asvd_channel_scale(act_absmean, alpha).to(W64.device)
    A, sig, Bh = torch.linalg.svd(W64 * s, full_matrices=False)
    return Expansion(A, sig, Bh / s)


# --------------------------------------------------------------------------------------------------
# 5. FWSVD


def fisher_weighted_svd(
    W: Tensor, row_importance: Tensor, rank: int, *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """FWSVD (Hsu et al., ICLR 2022): Fisher-weighted SVD with one weight per OUTPUT row of ``W``.

    The paper approximates the per-parameter Fisher ``I_ij = sum over samples of (dL/dW_ij)^2`` by its
    row sums ``I_i = sum_j I_ij`` (passed in as ``row_importance``, length ``out``) and solves
    ``min ||diag(w) (W - U V)||_F`` with ``w = sqrt(I)``: SVD of ``diag(w) W = A Sigma B^T``,
    ``U = diag(1/w) A_r sqrt(Sigma_r)``, ``V = sqrt(Sigma_r) B_r^T``. ``w`` is clamped below at
    ``1e-6 * max(w)``; all-zero importance degrades to plain SVD.

    Side: the paper writes ``Î W`` with the row-sum weights multiplying the stored matrix from the left
    and ``A = Î^{-1} U* S*``; applied to the PyTorch ``[out, in]`` layout that weights output features.
    It is also the side that is not redundant with activation-aware methods: for one token
    ``dL/dW_ij = g_i x_j``, so a row sum is ``g_i^2 ||x||^2`` (how much the loss cares about output i),
    while a column sum mostly re-measures input activation magnitude, which ASVD/SVD-LLM already use. (Some reimplementations transpose to
    ``[in, out]`` first and so weight inputs; we do not.)
    """
    _check_rank(rank, min(W.shape))
    U, V = fisher_expansion(W, row_importance).factors(rank)
    return _out(U, W, dtype), _out(V, W, dtype)


def fisher_expansion(W: Tensor, row_importance: Tensor) -> Expansion:
    """``W = (diag(1/w) A) Sigma B^T`` from the SVD of ``diag(w) W`` (float64): the expansion FWSVD truncates."""
    _check_matrix(W)
    if row_importance.shape != (W.shape[0],):
        raise ValueError(f"row_importance must have shape ({W.shape[0]},), got {tuple(row_importance.shape)}")
    W64 = _f64(W)
    imp = _f64(row_importance).to(W64.device)
    imp = torch.nan_to_num(imp, nan=0.0, posinf=0.0).clamp_min(0)
    w = imp.sqrt()
    wmax = float(w.max())
    w = w.clamp_min(_SCALE_FLOOR_REL * wmax) if wmax > 0 else torch.ones_like(w)
    A, sig, Bh = torch.linalg.svd(w[:, None] * W64, full_matrices=False)
    return Expansion(A / w[:, None], sig, Bh)


# --------------------------------------------------------------------------------------------------
# 6. Basis Sharing


def shared_basis_svd(
    weights: Sequence[Tensor], S: Tensor | None, rank: int, *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, list[Tensor]]:
    """Basis Sharing (Wang et al., ICLR 2025): one rank-r basis for a group of weights with equal ``in``.

    The paper uses ``[in, out]`` weights (``y = x W``) concatenated horizontally, ``[W_1, W_2, ...]``,
    and shares the left factor. In our ``[out, in]`` layout that is a vertical stack
    ``W_cat = [W_1; W_2; ...]`` (``[sum out_i, in]``) sharing the right factor. With ``S S^T`` the
    group's input Gram (sum of the layers' XtX, or ``None`` for plain SVD):
    ``W_cat S = A Sigma B^T``, ``basis = sqrt(Sigma_r) B_r^T S^{-1}`` ``[r, in]`` shared,
    ``coeff_i`` = the rows of ``A_r sqrt(Sigma_r)`` belonging to layer i, so ``W_i ~= coeff_i @ basis``
    and ``sum_i ||(W_i - coeff_i basis) S||_F^2 = sum_{j > r} sigma_j(W_cat S)^2``.
    """
    expansion, outs = _stacked_expansion(weights, S)
    _check_rank(rank, min(sum(outs), weights[0].shape[1]))
    coeff, basis = expansion.factors(rank)
    like = weights[0]
    coeffs = [_out(c, like, dtype) for c in torch.split(coeff, outs, dim=0)]
    return _out(basis, like, dtype), coeffs


def shared_basis_expansion(weights: Sequence[Tensor], S: Tensor | None) -> list[Expansion]:
    """Per member ``W_i = left_i Sigma right`` with ``right`` (the basis directions) shared: the rows of the
    stacked (whitened when ``S`` is given) expansion that Basis Sharing truncates, split by member."""
    expansion, outs = _stacked_expansion(weights, S)
    return [Expansion(a, expansion.s, expansion.right) for a in torch.split(expansion.left, outs, dim=0)]


def _stacked_expansion(weights: Sequence[Tensor], S: Tensor | None) -> tuple[Expansion, list[int]]:
    if len(weights) == 0:
        raise ValueError("weights is empty")
    for i, Wi in enumerate(weights):
        _check_matrix(Wi, f"weights[{i}]")
    n = weights[0].shape[1]
    if any(Wi.shape[1] != n for Wi in weights):
        raise ValueError(f"all weights must share in={n}, got {[tuple(Wi.shape) for Wi in weights]}")
    dev = _f64(weights[0]).device
    W_cat = torch.cat([_f64(Wi).to(dev) for Wi in weights], dim=0)  # (sum out_i, in)
    expansion = svd_expansion(W_cat) if S is None else whitened_expansion(W_cat, S)
    return expansion, [Wi.shape[0] for Wi in weights]


# --------------------------------------------------------------------------------------------------
# 7. loss estimate for rank allocation (used by rankserve.ranks.allocate_ranks_by_loss)


def kfac_truncation_loss(
    expansions: Sequence[Expansion], xtx: Sequence[Tensor], gtg: Sequence[Tensor]
) -> Tensor:
    """Second-order estimate of the loss increase when a slot keeps the first r terms, for every r at once.

    ``est[r]`` for ``r = 0..k`` (float64, ``est[k] = 0``), summed over the slot's members: member m's error
    is ``dW = sum_{j >= r} left_j s_j right_j`` and its cost is the Kronecker-factored (K-FAC) Fisher form
    ``1/2 tr(dW X dW^T G)`` with ``X = E[x x^T]`` the input second moment and ``G = E[g g^T]`` that of the
    loss gradient at the output (pass means, not sums, to read the result as nats per token). With
    ``P = (L^T G L) * (R X R^T)`` (``L = left diag(s)``, ``R = right``, ``*`` elementwise) the estimate is the
    sum of the trailing block ``P[r:, r:]``: one product per member gives the whole curve, no re-factorization.
    For SVD-LLM ``R X R^T = I`` and the curve is ``1/2 sum_{j >= r} s_j^2 (a_j^T G a_j)``: its whitened
    truncation loss with each direction weighted by how much the loss cares about it.
    """
    if not (len(expansions) == len(xtx) == len(gtg)) or not expansions:
        raise ValueError("expansions, xtx and gtg must be non-empty and of equal length")
    k = expansions[0].s.numel()
    P = torch.zeros(k, k, dtype=torch.float64)
    for e, X, G in zip(expansions, xtx, gtg, strict=True):
        if e.s.numel() != k:
            raise ValueError("every member of a slot must have the same number of terms")
        out, inp = e.left.shape[0], e.right.shape[1]
        _check_gram(X, inp)
        if G.shape != (out, out):
            raise ValueError(
                f"G must be [{out}, {out}] for a member with {out} outputs, got {tuple(G.shape)}"
            )
        L = e.left * e.s  # (out, k)
        P += ((L.mT @ _f64(G).to(L.device) @ L) * (e.right @ _f64(X).to(L.device) @ e.right.mT)).cpu()
    tail = P.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1)  # tail[r, c] = P[r:, c:].sum()
    return torch.cat([0.5 * torch.diagonal(tail), torch.zeros(1, dtype=torch.float64)])
