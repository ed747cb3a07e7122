"""Orthonormal Hadamard matrices of the sizes LinearPatch rotates the residual stream with.

LinearPatch's ``get_hadamard_matrix(n)`` (``rotate_utils/hadamard_utils.py``, adapted from QuIP#/QuaRot) applies a
Walsh–Hadamard butterfly to the identity and then one ±1 matrix H_K of a small order K from Sloane's table of
Hadamard matrices; as a matrix its result is kron(H_Kᵀ, S_{n/K}) / √n, S_m being Sylvester's ±1 matrix of order m (a
power of two; ``scipy.linalg.hadamard``). K is the first of 172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12 that
divides n (K = 1 when none does), and n/K must be a power of two.

The tables are data we do not copy: every H_K below is built from its definition, and for K = 12, 20, 28, 36, 40, 60,
108 and 140 the construction equals the official table entry for entry (tests/test_linearpatch.py holds the sha256 of
each official table's sign pattern, and transcribes the official butterfly):

* K = q + 1 for a prime q ≡ 3 (mod 4) (12, 20, 60, 108, 140: q = 11, 19, 59, 107, 139): Paley's first construction
  in the skew form the table uses, I + S with S = [[0, −1ᵀ], [1, Q]], Q[i][j] = χ(i − j) the quadratic character
  of GF(q) (elements in the order 0..q−1);
* K = 2(q + 1) for a prime q ≡ 1 (mod 4) (28, 36: q = 13, 17): Paley's second construction in block form,
  [[C + I, C − I], [C − I, −C − I]] with the symmetric conference matrix C = [[0, 1ᵀ], [1, Q]];
* K = 40: kron([[1, 1], [1, −1]], H_20).

The table's matrices of order 52, 156 and 172 are not built by these constructions; a hidden size that needs one is
refused (one line) rather than rotated by a different matrix than the official one.
"""

from __future__ import annotations

import math

import torch

from ...errors import UnsupportedArchitectureError

#: the orders the official code tries, in its order (the first that divides n wins)
OFFICIAL_ORDERS = (172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12)
#: orders whose official table entry no construction here reproduces
UNBUILT = frozenset({52, 156, 172})


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def sylvester(m: int) -> torch.Tensor:
    """Sylvester's ±1 Hadamard matrix of order m (a power of two), float64."""
    if not _is_pow2(m):
        raise ValueError(f"Sylvester's construction needs a power of two, got {m}")
    h = torch.ones(1, 1, dtype=torch.float64)
    two = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.kron(two, h)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i][j] = χ(i − j) over GF(q), q prime: 1 for a nonzero square, −1 for a non-square, 0 on the diagonal."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    return torch.tensor([[chi[(i - j) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def paley_skew(q: int) -> torch.Tensor:
    """Paley I, order q + 1 (q prime, q ≡ 3 mod 4), in the skew form I + S."""
    k = q + 1
    s = torch.zeros(k, k, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = -1.0, 1.0, _jacobsthal(q)
    return torch.eye(k, dtype=torch.float64) + s


def paley_symmetric(q: int) -> torch.Tensor:
    """Paley II, order 2(q + 1) (q prime, q ≡ 1 mod 4), in block form."""
    m = q + 1
    c = torch.zeros(m, m, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    eye = torch.eye(m, dtype=torch.float64)
    return torch.cat([torch.cat([c + eye, c - eye], 1), torch.cat([c - eye, -c - eye], 1)], 0)


def small_hadamard(k: int) -> torch.Tensor:
    """The ±1 matrix of order ``k`` the official table holds (one of ``OFFICIAL_ORDERS`` not in ``UNBUILT``)."""
    skew = {12: 11, 20: 19, 60: 59, 108: 107, 140: 139}
    symmetric = {28: 13, 36: 17}
    if k in skew:
        return paley_skew(skew[k])
    if k in symmetric:
        return paley_symmetric(symmetric[k])
    if k == 40:
        return torch.kron(sylvester(2), paley_skew(19))
    raise ValueError(f"no construction of the official Hadamard matrix of order {k}")


def hadamard_order(n: int) -> int:
    """The official K for size n (1: a power of two); a one-line refusal where the official code has no matrix (its
    assertion fails) or ours differs from its table."""
    k = next((k for k in OFFICIAL_ORDERS if n % k == 0), 1)
    if not _is_pow2(n // k) or n < 1:
        raise UnsupportedArchitectureError(f"linearpatch: hidden size {n} has no Hadamard matrix in the official "
                                           "construction (n/K must be a power of two for K in 1, 12, 20, 28, 36, 40, "
                                           "52, 60, 108, 140, 156, 172)")
    if k in UNBUILT:
        raise UnsupportedArchitectureError(f"linearpatch: hidden size {n} needs the official order-{k} Hadamard "
                                           "matrix, which is not reproduced here (orders 52, 156 and 172)")
    return k


def hadamard_matrix(n: int) -> torch.Tensor:
    """The official ``get_hadamard_matrix(n)``: an orthonormal [n, n] float64 matrix, kron(H_Kᵀ, S_{n/K}) / √n."""
    k = hadamard_order(n)
    h = sylvester(n) if k == 1 else torch.kron(small_hadamard(k).T.contiguous(), sylvester(n // k))
    return h / math.sqrt(n)
