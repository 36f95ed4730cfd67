"""The subspace distance of section 6.2 on matrices whose principal angles are known."""

import numpy as np
import pytest

from jaxlm.subspace import subspace_distance


def rotation(rows, seed):
  """A random orthogonal [rows, rows] matrix."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(rows, rows)))
  return q


def test_same_space_in_another_basis_is_at_distance_zero():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(50, 6))
  b = a @ rng.normal(size=(6, 6))  # the same column space, another basis
  assert subspace_distance(a, b) == pytest.approx(0.0, abs=1e-7)
  assert subspace_distance(b, a) == pytest.approx(0.0, abs=1e-7)


def test_orthogonal_spaces_are_at_distance_one():
  q = rotation(40, 1)
  a, b = q[:, :5] @ np.diag([1.0, 2, 3, 4, 5]), q[:, 5:10]
  assert subspace_distance(a, b) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize('angles', [[0.3], [0.2, 1.1], [0.0, np.pi / 2, 0.7]])
def test_known_principal_angles(angles):
  """Columns a_i = q_i and b_i = cos(t_i) q_i + sin(t_i) q_{d+i} of one orthonormal set have
  principal angles t_i, so the distance is sqrt(1 - mean cos^2 t_i)."""
  d = len(angles)
  q = rotation(3 * d + 4, 2)
  a = q[:, :d]
  b = q[:, :d] * np.cos(angles) + q[:, d:2 * d] * np.sin(angles)
  expected = np.sqrt(1 - np.mean(np.square(np.cos(angles))))
  # Any change of basis of either space, and any rotation of the whole, changes nothing.
  rng = np.random.default_rng(3)
  mix_a, mix_b, turn = rng.normal(size=(d, d)), rng.normal(size=(d, d)), rotation(len(q), 4)
  assert subspace_distance(a, b) == pytest.approx(expected, abs=1e-10)
  assert subspace_distance(turn @ a @ mix_a, turn @ b @ mix_b) == pytest.approx(expected,
                                                                              abs=1e-8)


def test_embedding_shaped_matrices_in_float32():
  """[V, d] float32 matrices as the models hold them: a random pair of 20-dimensional spaces
  in 2,000 dimensions is nearly orthogonal (mean cos^2 about d / V)."""
  rng = np.random.default_rng(5)
  e = rng.normal(size=(2000, 20)).astype(np.float32)
  w = rng.normal(size=(2000, 20)).astype(np.float32)
  assert subspace_distance(e, w) == pytest.approx(np.sqrt(1 - 20 / 2000), abs=0.01)
  assert subspace_distance(e, e @ rng.normal(size=(20, 20))) < 1e-5


def test_mismatched_shapes_are_an_error():
  with pytest.raises(ValueError, match='same number of rows'):
    subspace_distance(np.ones((5, 2)), np.ones((6, 2)))
