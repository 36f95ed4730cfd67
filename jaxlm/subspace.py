"""The distance between the column spaces of two matrices (Inan et al. 2016, section 6.2).

The paper checks its theory by how close the output classifier W comes to the space of the
embedding E, both [V, d]: with orthonormal bases Q_E, Q_W of their column spaces,

  distance = ||Q_E - Q_W Q_W^T Q_E||_F / ||Q_E||_F = sqrt(1 - mean_i cos^2 theta_i),

Bjorck and Golub's relative residual of projecting one space onto the other, over the principal
angles theta_i: 0 for the same space, 1 for orthogonal spaces.
"""

import numpy as np


def orthonormal_basis(a: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
  """An orthonormal basis [rows, rank] of the column space of `a` [rows, cols], in float64.

  The rank counts the singular values above `rtol` times the largest, so a rank-deficient
  matrix gets a basis of its true column space.
  """
  u, s, _ = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
  if s.size == 0 or s[0] == 0:
    raise ValueError('the matrix is zero: its column space is empty')
  return u[:, s > rtol * s[0]]


def subspace_distance(a: np.ndarray, b: np.ndarray) -> float:
  """sqrt(1 - mean cos^2 theta) over the principal angles between the column spaces of `a` and
  `b` ([V, d_a] and [V, d_b]), measured from the space of `a`: ||Q_a - Q_b Q_b^T Q_a||_F /
  ||Q_a||_F. In [0, 1]; unchanged by any change of basis of either space.
  """
  a, b = np.asarray(a), np.asarray(b)
  if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
    raise ValueError(f'expected two matrices with the same number of rows, got {a.shape} and'
                     f' {b.shape}')
  q_a, q_b = orthonormal_basis(a), orthonormal_basis(b)
  # ||Q_a - Q_b M||^2 = ||Q_a||^2 - ||M||^2 with M = Q_b^T Q_a, and ||Q_a||^2 = rank(a).
  cos_squared = np.sum(np.square(q_b.T @ q_a)) / q_a.shape[1]
  return float(np.sqrt(max(0.0, 1.0 - cos_squared)))
