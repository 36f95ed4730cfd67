"""Tokenization and the word vocabulary.

A line is split on whitespace and ends with `EOS` (every line, empty ones too; no
lowercasing), as in Mikolov's PTB setup. Word ids are deterministic: most frequent first,
ties broken by first appearance in the training text.
"""

from collections.abc import Iterable, Sequence
import collections
import itertools
import os

import numpy as np

from jaxlm.errors import UserError

EOS = '<eos>'
UNK = '<unk>'


def tokenize_line(line: str) -> list[str]:
  """Splits `line` on whitespace and appends `EOS`."""
  return line.split() + [EOS]


class Vocabulary:
  """An immutable word <-> id mapping; the id of a word is its position in `words`."""

  __slots__ = ('_words', '_index')

  def __init__(self, words: Iterable[str]):
    words = tuple(words)
    index = {}
    for i, word in enumerate(words):
      if not isinstance(word, str) or word.split() != [word]:
        raise ValueError(f'Vocabulary word {i} is {word!r}; words must be non-empty '
                         'strings without whitespace.')
      if word in index:
        raise ValueError(f'Vocabulary word {word!r} appears twice (ids {index[word]} '
                         f'and {i}).')
      index[word] = i
    self._words = words
    self._index = index

  @classmethod
  def build(cls, lines: Iterable[Sequence[str]]) -> 'Vocabulary':
    """Builds the vocabulary of tokenized `lines`, by decreasing count, ties by first use."""
    counts = collections.Counter(itertools.chain.from_iterable(lines))
    # Counter keeps first-insertion order and `sorted` is stable.
    ordered = sorted(counts.items(), key=lambda item: -item[1])
    return cls(word for word, _ in ordered)

  @property
  def words(self) -> tuple[str, ...]:
    """All words; `words[i]` has id `i`."""
    return self._words

  def __len__(self) -> int:
    return len(self._words)

  def __contains__(self, word: object) -> bool:
    return word in self._index

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Vocabulary):
      return NotImplemented
    return self._words == other._words

  def __hash__(self) -> int:
    return hash(self._words)

  def __repr__(self) -> str:
    head = ', '.join(self._words[:5])
    return f'Vocabulary({len(self)} words: {head}{", ..." if len(self) > 5 else ""})'

  def id(self, word: str) -> int:
    """Returns the id of `word`; raises `UserError` if it is not in the vocabulary."""
    try:
      return self._index[word]
    except KeyError:
      raise UserError(f'Word {word!r} is not in the vocabulary ({len(self)} words); '
                      'use a word of the training data.') from None

  def encode(self, tokens: Sequence[str]) -> tuple[np.ndarray, int]:
    """Maps tokens to ids.

    Args:
      tokens: words, e.g. from `tokenize_line`.

    Returns:
      (ids, num_oov): int32 ids of shape [len(tokens)], and how many tokens were not in
      the vocabulary and were mapped to `UNK`.

    Raises:
      UserError: a token is not in the vocabulary and the vocabulary has no `UNK`.
    """
    index = self._index
    ids = np.fromiter(map(index.get, tokens, itertools.repeat(-1)), dtype=np.int32,
                      count=len(tokens))
    oov = ids < 0
    num_oov = int(oov.sum())
    if num_oov:
      if UNK not in index:
        unknown = list(dict.fromkeys(t for t, o in zip(tokens, oov) if o))
        shown = ', '.join(repr(w) for w in unknown[:5])
        more = f' and {len(unknown) - 5} more' if len(unknown) > 5 else ''
        raise UserError(f'Unknown words {shown}{more}, and the vocabulary has no {UNK!r} '
                        'to map them to; use text whose words are all in the vocabulary.')
      ids[oov] = index[UNK]
    return ids, num_oov

  def decode(self, ids: Iterable[int] | np.ndarray) -> list[str]:
    """Maps a 1-D sequence of ids back to words."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(f'decode expects a 1-D sequence of ids, got shape {ids.shape}.')
    if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
      raise ValueError(f'Ids must lie in [0, {len(self)}); got {ids.min()}..{ids.max()}.')
    return [self._words[i] for i in ids.tolist()]

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes one word per line (UTF-8); the line number (from 0) is the id."""
    with open(path, 'w', encoding='utf-8', newline='\n') as f:
      f.write(''.join(word + '\n' for word in self._words))

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> 'Vocabulary':
    """Reads a file written by `save`."""
    try:
      with open(path, encoding='utf-8', newline='\n') as f:
        text = f.read()
    except FileNotFoundError:
      raise UserError(f'Vocabulary file {os.fspath(path)} does not exist; pass the path '
                      'of a vocab file written by Vocabulary.save.') from None
    words = text.split('\n')
    if words and not words[-1]:
      words.pop()
    try:
      return cls(words)
    except ValueError as e:
      raise UserError(f'Vocabulary file {os.fspath(path)} is malformed ({e}); '
                      'it must hold one distinct word per line.') from None
