"""Cutting a token stream into BPTT windows (pure numpy; the batch axis leads).

Training: the stream is cut into `batch` contiguous streams and read left to right in
windows of `bptt` steps, the recurrent state carried from one window to the next; the
ragged tail is dropped.

Evaluation: every token after the first is predicted exactly once. The N - 1 targets are
split into `batch` streams of equal length S; stream b's inputs start at the token before
its first target (so consecutive streams overlap by one token), and the remainder is
padded with weight 0.
"""

import math

import numpy as np

from jaxlm.errors import UserError


def _check_positive(name: str, value: int) -> None:
  if value <= 0:
    raise UserError(f'{name} must be positive, got {value}.')


def contiguous_run(ids: np.ndarray, length: int, seed: int) -> np.ndarray:
  """`length` consecutive tokens of `ids` [N], starting at a position drawn from `seed`."""
  _check_positive('length', length)
  if length > len(ids):
    raise UserError(f'data.train_words ({length}) is longer than the train split ({len(ids)}'
                    ' tokens): lower it, or unset it to train on the whole split')
  start = np.random.default_rng(seed).integers(0, len(ids) - length + 1)
  return np.asarray(ids)[start:start + length]


def train_streams(ids: np.ndarray, batch_size: int) -> np.ndarray:
  """Cuts `ids` [N] into `batch_size` contiguous streams.

  Returns:
    int32 [batch_size, L] with L = N // batch_size; row b is ids[b*L:(b+1)*L].
  """
  _check_positive('batch_size', batch_size)
  ids = np.asarray(ids)
  length = len(ids) // batch_size
  if length < 2:
    raise UserError(f'A corpus of {len(ids)} tokens is too short for batch size '
                    f'{batch_size}; use a smaller batch size.')
  return ids[:batch_size * length].reshape(batch_size, length).astype(np.int32)


def num_train_windows(streams: np.ndarray, bptt: int) -> int:
  """Number of full windows of `bptt` steps in `streams` [batch, L]: (L - 1) // bptt."""
  _check_positive('bptt', bptt)
  return (streams.shape[1] - 1) // bptt


def train_window(streams: np.ndarray, index: int,
                 bptt: int) -> tuple[np.ndarray, np.ndarray]:
  """Window `index` of `streams` [batch, L].

  Returns:
    (inputs, targets), int32 [batch, bptt]: inputs = streams[:, i*bptt:(i+1)*bptt],
    targets the same shifted by one step.
  """
  num = num_train_windows(streams, bptt)
  if not 0 <= index < num:
    raise IndexError(f'Window index {index} out of range [0, {num}).')
  start = index * bptt
  inputs = streams[:, start:start + bptt]
  targets = streams[:, start + 1:start + bptt + 1]
  return inputs.astype(np.int32), targets.astype(np.int32)


def max_distinct_targets(streams: np.ndarray, bptt: int) -> int:
  """The largest number of distinct target ids in one training window of `streams`.

  A static bound for the augmented loss, which builds its target distribution once per
  distinct target (`losses.fused_ce_and_kl`). PTB, batch 20 x bptt 35: at most about 400 of
  the 700 targets of a window are distinct.
  """
  num = num_train_windows(streams, bptt)
  targets = streams[:, 1:num * bptt + 1].reshape(streams.shape[0], num, bptt)
  targets = np.sort(targets.transpose(1, 0, 2).reshape(num, -1), axis=1)
  return int(np.max(1 + np.sum(targets[:, 1:] != targets[:, :-1], axis=1)))


def eval_windows(
    ids: np.ndarray,
    batch_size: int,
    bptt: int,
    max_tokens: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Windows that predict every token of `ids` [N] after the first exactly once.

  Args:
    ids: the token stream.
    batch_size: number of parallel streams.
    bptt: window length.
    max_tokens: if set, only the first `max_tokens` targets (ids[1:max_tokens+1]).

  Returns:
    (inputs, targets, weights), each [num_windows, batch_size, bptt], int32, int32,
    float32. Padding has id 0 and weight 0; sum(weights) == number of targets, and the
    weighted (input, target) pairs, read window by window per stream, are the
    consecutive pairs of `ids` in order.
  """
  _check_positive('batch_size', batch_size)
  _check_positive('bptt', bptt)
  ids = np.asarray(ids)
  if max_tokens is not None:
    _check_positive('max_tokens', max_tokens)
    ids = ids[:max_tokens + 1]
  num_targets = len(ids) - 1
  if num_targets < 1:
    raise UserError(f'Evaluation needs at least 2 tokens, got {len(ids)}.')
  stream_len = math.ceil(num_targets / batch_size)
  num_windows = math.ceil(stream_len / bptt)
  padded_len = num_windows * bptt
  # pos[b, j]: position of the j-th input of stream b.
  offset = np.arange(padded_len)
  pos = np.arange(batch_size)[:, None] * stream_len + offset[None, :]
  valid = (offset[None, :] < stream_len) & (pos < num_targets)
  pos = np.where(valid, pos, 0)
  inputs = np.where(valid, ids[pos], 0).astype(np.int32)
  targets = np.where(valid, ids[pos + 1], 0).astype(np.int32)
  weights = valid.astype(np.float32)

  def to_windows(x):  # [batch, windows * bptt] -> [windows, batch, bptt]
    return np.ascontiguousarray(
        x.reshape(batch_size, num_windows, bptt).transpose(1, 0, 2))

  return to_windows(inputs), to_windows(targets), to_windows(weights)
