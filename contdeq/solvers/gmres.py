"""Batched, restarted, matrix-free GMRES: ``A_b x_b = b_b`` for every sample ``b`` of a batch.

Each sample has its own Krylov space; one call of ``matvec`` advances all of them. The Arnoldi
basis is orthogonalised by classical Gram-Schmidt (two batched matrix products per pass) with a
second pass where a sample's vector lost more than 30 % of its norm (the DGKS criterion:
"twice is enough"), which is as stable as modified Gram-Schmidt with re-orthogonalisation at a
fixed, small number of tensor operations per iteration. On small Krylov bases the products
are broadcast multiplies and sums, not ``torch.bmm``: on a loaded 2-core CPU a float64 ``bmm``
of shape ``(2, 60, 100)`` took about 11 ms with two threads (its BLAS threads wait on each
other), which made a solve 20x slower; on large ones (scipy's 75x75 PDE) ``bmm`` is faster
(the broadcast's temporaries took half the solve's time). The small Hessenberg problem is kept in
float64 and reduced by Givens rotations accumulated in an explicit orthogonal matrix, so
applying all earlier rotations to a new column is one batched product.

**Breakdown.** When a new Arnoldi vector vanishes (its norm falls below a few rounding units of
``||A v||``) the sample's Krylov space is exhausted. If ``A`` is nonsingular on it this is the
"lucky" breakdown and the iterate is exact; if ``A`` is singular and ``b`` has a part outside
its range (an inconsistent system), the small triangular factor is singular too. Either way the
sample stops, its correction is the minimum-norm least-squares solution of the small problem
(by a pseudo-inverse where the triangle is numerically singular, so it stays finite), its
residual is the small problem's true least-squares residual (never the Givens estimate, which
reads zero at such a breakdown), and it is not restarted: ``converged`` is then ``False`` unless
that residual meets the tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .validation import check_positive_int

#: A vector whose norm drops below this fraction by one Gram-Schmidt pass is orthogonalised
#: again (Daniel, Gragg, Kaufman & Stewart 1976; Giraud et al. 2005 use 1/sqrt(2)).
_REORTHOGONALIZE_BELOW = 0.7
#: A new Arnoldi vector shorter than this many rounding units of ``||A v||`` is a breakdown.
_BREAKDOWN_ULPS = 16.0
#: Basis products by broadcasting up to this many elements per sample, by ``torch.bmm`` above.
_BROADCAST_MAX_ELEMENTS = 16384


@dataclass
class GMRESResult:
    """What :func:`gmres` returns.

    Attributes:
        solution: ``(B, D)`` approximate solutions ``x``.
        residual: ``(B,)`` RMS of ``b - A x`` per sample (the small least-squares problem's
            residual, which equals the true residual up to rounding).
        converged: ``(B,)`` bool, ``residual <= atol + rtol * rms(b)``; ``False`` for a sample
            whose Krylov space broke down short of the tolerance (a singular, inconsistent
            system: its ``solution`` is then a finite least-squares iterate).
        iterations: ``(B,)`` Arnoldi steps (products with ``A``) each sample took part in.
        steps: batched Arnoldi steps (calls of ``matvec`` that extend a Krylov space).
        matvecs: batched calls of ``matvec`` (``steps``, plus one per restart and one for a
            given ``x0``).
    """

    solution: Tensor
    residual: Tensor
    converged: Tensor
    iterations: Tensor
    steps: int
    matvecs: int


def gmres(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    rtol: float | Tensor = 1e-5,
    atol: float | Tensor = 0.0,
    restart: int = 30,
    max_iterations: int = 300,
) -> GMRESResult:
    """Solve ``A_b x_b = b_b`` per sample by restarted GMRES, ``A`` known only by products.

    Sample ``b`` stops (its Krylov space is frozen and its vectors are zero in later products)
    once ``rms(b_b - A_b x_b) <= atol_b + rtol_b * rms(b_b)``, or when its Krylov space breaks
    down (see the module docstring: a finite least-squares iterate, ``converged`` ``False``
    unless the tolerance is met).

    Args:
        matvec: ``v -> A v`` on ``(B, D)`` tensors, acting on each sample separately and
            linearly (a zero row must give a zero row).
        b: ``(B, D)`` right-hand sides.
        x0: ``(B, D)`` initial guess (default zero, which saves one product).
        rtol, atol: tolerances, floats or ``(B,)`` tensors (per-sample forcing terms).
        restart: Krylov dimension before a restart.
        max_iterations: limit on Arnoldi steps (products with ``A``), restarts included.

    Returns:
        A :class:`GMRESResult`.
    """
    if not isinstance(b, Tensor) or b.ndim != 2:
        raise ValueError(f"b must be a (B, D) tensor, got {getattr(b, 'shape', type(b))}")
    check_positive_int(restart, "restart")
    check_positive_int(max_iterations, "max_iterations")
    batch, dim = b.shape
    restart = min(restart, dim)
    # Everything below works in L2 norms; the tolerance is given in RMS units.
    root_d = math.sqrt(dim)
    b_norm = torch.linalg.vector_norm(b, dim=1).double()
    target = (_per_sample(atol, "atol", b) * root_d + _per_sample(rtol, "rtol", b) * b_norm)
    if x0 is None:
        x, r, matvecs = torch.zeros_like(b), b, 0
    else:
        x, r, matvecs = x0.clone(), b - matvec(x0), 1
    iterations = torch.zeros(batch, dtype=torch.long, device=b.device)
    r_norm = torch.linalg.vector_norm(r, dim=1).double()
    active = r_norm > target
    stuck = torch.zeros_like(active)  # broke down short of the tolerance: not restarted
    steps = 0
    while bool(active.any()) and steps < max_iterations:
        if steps > 0:  # a restart: the true residual of the current x
            r = b - matvec(x)
            matvecs += 1
            r_norm = torch.where(stuck, r_norm,
                                 torch.linalg.vector_norm(r, dim=1).double())
            active = (r_norm > target) & ~stuck
            if not bool(active.any()):
                break
        length = min(restart, max_iterations - steps)
        dx, r_norm, used, broke = _cycle(matvec, r, r_norm, active, target, length)
        x = x + dx
        matvecs += int(used.max())
        steps += int(used.max())
        iterations += used
        stuck |= broke & (r_norm > target)
        active = (r_norm > target) & ~stuck
    return GMRESResult(
        solution=x, residual=(r_norm / root_d).to(b.dtype), converged=r_norm <= target,
        iterations=iterations, steps=steps, matvecs=matvecs,
    )


def _per_sample(value: float | Tensor, name: str, b: Tensor) -> Tensor:
    """A float or ``(B,)`` tolerance as a ``(B,)`` float64 tensor (checked >= 0, finite)."""
    if isinstance(value, Tensor):
        out = value.detach().to(dtype=torch.float64, device=b.device).expand(b.shape[0])
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out = torch.full((b.shape[0],), float(value), dtype=torch.float64, device=b.device)
    else:
        raise TypeError(f"{name} must be a float or a (B,) tensor, got {type(value).__name__}")
    if not bool(torch.isfinite(out).all()) or bool((out < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")
    return out


def _cycle(
    matvec: Callable[[Tensor], Tensor], r: Tensor, r_norm: Tensor, active: Tensor,
    target: Tensor, length: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One GMRES cycle of at most ``length`` Arnoldi steps from residual ``r`` (``(B, D)``).

    Returns the correction ``(B, D)``, the residual norms ``(B,)`` of the small least-squares
    problem (L2, float64), the number of steps each sample took ``(B,)`` and which samples'
    Krylov spaces broke down ``(B,)`` bool.
    """
    batch, dim = r.shape
    dtype = r.dtype
    basis = r.new_zeros(batch, length + 1, dim)
    basis[:, 0] = r / torch.where(active, r_norm, 1.0).to(dtype).unsqueeze(1) * active.unsqueeze(1)
    # The triangular factor R of the Hessenberg matrix, and Q^T (Givens rotations) on it.
    tri = torch.zeros(batch, length, length, dtype=torch.float64, device=r.device)
    q_t = torch.eye(length + 1, dtype=torch.float64, device=r.device).repeat(batch, 1, 1)
    used = torch.zeros(batch, dtype=torch.long, device=r.device)
    broke = torch.zeros_like(active)
    estimate = r_norm.clone()
    ulp = torch.finfo(dtype).eps * _BREAKDOWN_ULPS
    for j in range(length):
        w = matvec(basis[:, j])
        scale = torch.linalg.vector_norm(w, dim=1)
        h, w = _orthogonalize(w, basis[:, : j + 1])
        h_next = torch.linalg.vector_norm(w, dim=1)
        column = torch.cat([h.double(), h_next.double().unsqueeze(1)], dim=1)  # (B, j + 2)
        rotated = (q_t[:, : j + 2, : j + 2] * column.unsqueeze(1)).sum(2)
        a, c = rotated[:, j], rotated[:, j + 1]
        radius = torch.hypot(a, c)
        safe = torch.where(radius > 0, radius, 1.0)
        cos, sin = torch.where(radius > 0, a / safe, 1.0), c / safe
        rotated[:, j] = radius
        tri[:, : j + 1, j] = torch.where(active.unsqueeze(1), rotated[:, : j + 1], 0.0)
        row_j, row_next = q_t[:, j].clone(), q_t[:, j + 1].clone()
        q_t[:, j] = torch.where(active.unsqueeze(1), cos.unsqueeze(1) * row_j
                                + sin.unsqueeze(1) * row_next, row_j)
        q_t[:, j + 1] = torch.where(active.unsqueeze(1), cos.unsqueeze(1) * row_next
                                    - sin.unsqueeze(1) * row_j, row_next)
        used += active
        estimate = torch.where(active, r_norm * q_t[:, j + 1, 0].abs(), estimate)
        exhausted = active & (h_next <= ulp * scale)
        broke |= exhausted
        active = active & (estimate > target) & ~exhausted
        basis[:, j + 1] = (w / torch.where(active, h_next, 1.0).unsqueeze(1)
                           ) * active.unsqueeze(1)
        if not bool(active.any()):
            break
    steps = int(used.max())
    # Per sample, the least-squares solution over its own ``used`` columns: the unused part of
    # the triangle is replaced by the identity and its right-hand side by zero.
    own = torch.arange(steps, device=r.device) < used.unsqueeze(1)  # (B, steps)
    square = own.unsqueeze(2) & own.unsqueeze(1)
    eye = torch.eye(steps, dtype=torch.float64, device=r.device).expand(batch, -1, -1)
    tri_k = torch.where(square, tri[:, :steps, :steps], eye)
    g = r_norm.unsqueeze(1) * q_t[:, : steps + 1, 0]  # Q^T (||r|| e_1), (B, steps + 1)
    rhs = torch.where(own, g[:, :steps], 0.0)
    y = _triangular_least_squares(tri_k, rhs, torch.finfo(dtype).eps * _BREAKDOWN_ULPS)
    # The small problem's least-squares residual ||Q^T ||r|| e_1 - [R y; 0]||: equal to the
    # Givens estimate unless R is singular, where the estimate would read zero.
    fitted = torch.cat([(tri_k @ y.unsqueeze(2)).squeeze(2), g.new_zeros(batch, 1)], dim=1)
    # (An idle sample has y = 0 and g = (||r||, 0, ...): its residual stays ||r||.)
    estimate = torch.linalg.vector_norm(g - fitted, dim=1)
    correction = _combine(y.to(dtype), basis[:, :steps])
    return correction, estimate, used, broke


def _triangular_least_squares(tri: Tensor, rhs: Tensor, rcond: float) -> Tensor:
    """``(B, k)`` minimum-norm least-squares solutions of ``tri_b y_b = rhs_b`` (``tri``:
    ``(B, k, k)`` upper triangular, float64): by back substitution, or by a pseudo-inverse
    (singular values below ``rcond`` times the largest dropped) for the samples whose triangle
    is numerically singular (a diagonal entry below ``rcond`` times the largest)."""
    diag = tri.diagonal(dim1=1, dim2=2).abs()
    singular = (diag <= rcond * diag.amax(dim=1, keepdim=True)).any(dim=1)
    safe = torch.where(singular.view(-1, 1, 1), torch.eye(
        tri.shape[1], dtype=tri.dtype, device=tri.device), tri)
    y = torch.linalg.solve_triangular(safe, rhs.unsqueeze(2), upper=True).squeeze(2)
    if bool(singular.any()):
        pinv = torch.linalg.pinv(tri[singular], rtol=rcond)
        y[singular] = (pinv @ rhs[singular].unsqueeze(2)).squeeze(2)
    return y


def _orthogonalize(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Orthogonalise ``w`` (``(B, D)``) against the orthonormal rows of ``basis`` (``(B, k, D)``)
    by classical Gram-Schmidt, twice where needed; returns the coefficients ``(B, k)`` and the
    remainder ``(B, D)``."""
    before = torch.linalg.vector_norm(w, dim=1)
    h = _project(basis, w)  # (B, k)
    w = w - _combine(h, basis)
    after = torch.linalg.vector_norm(w, dim=1)
    if bool((after < _REORTHOGONALIZE_BELOW * before).any()):
        h2 = _project(basis, w)
        w = w - _combine(h2, basis)
        h = h + h2
    return h, w


def _project(basis: Tensor, w: Tensor) -> Tensor:
    """``(B, k)`` inner products of the rows of ``basis`` (``(B, k, D)``) with ``w``."""
    if basis[0].numel() <= _BROADCAST_MAX_ELEMENTS:
        return (basis * w.unsqueeze(1)).sum(2)
    return torch.bmm(basis, w.unsqueeze(2)).squeeze(2)


def _combine(coefficients: Tensor, basis: Tensor) -> Tensor:
    """``(B, D)`` sum of the rows of ``basis`` (``(B, k, D)``) weighted by ``(B, k)``."""
    if basis[0].numel() <= _BROADCAST_MAX_ELEMENTS:
        return (coefficients.unsqueeze(2) * basis).sum(1)
    return torch.bmm(coefficients.unsqueeze(1), basis).squeeze(1)
