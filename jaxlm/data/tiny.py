"""A tiny synthetic corpus with real structure, for smoke tests and demos.

Sentences come from a small grammar (about 200 word types): subject-verb number
agreement, also across a prepositional phrase ("the dog near the cats runs"), verbs that
select their objects (people read books, eat food), "there is one dog" / "there are three
dogs", counting ("ann counts four five six"), pronouns that agree with their antecedent,
and questions ("does the fox sleep ?"). A tiny LSTM learns much of it in seconds.

Names of rare people come from a large pool; as in Mikolov's PTB, every word seen fewer
than `_MIN_COUNT` times in train is replaced by '<unk>' in all splits, so valid and test
have no out-of-vocabulary words. Generation uses numpy's legacy `RandomState`, whose
stream numpy keeps fixed across versions, so the corpus is the same everywhere.
"""

from collections.abc import Callable, Sequence
import collections

import numpy as np

from jaxlm.data.vocab import UNK

# Number of lines per split: about 30k / 4k / 4k tokens.
SPLIT_LINES = {'train': 3600, 'valid': 480, 'test': 480}
SEED = 1611_01462  # arXiv id of Inan et al.
_MIN_COUNT = 3

# (singular, plural, pronoun of the singular).
_AGENTS = (
    ('dog', 'dogs', 'it'), ('cat', 'cats', 'it'), ('bird', 'birds', 'it'),
    ('horse', 'horses', 'it'), ('fox', 'foxes', 'it'), ('wolf', 'wolves', 'it'),
    ('mouse', 'mice', 'it'), ('child', 'children', 'she'), ('man', 'men', 'he'),
    ('woman', 'women', 'she'), ('king', 'kings', 'he'), ('queen', 'queens', 'she'),
    ('teacher', 'teachers', 'she'), ('farmer', 'farmers', 'he'),
    ('doctor', 'doctors', 'she'), ('student', 'students', 'he'),
    ('boy', 'boys', 'he'), ('girl', 'girls', 'she'),
)
_PEOPLE = tuple(a for a in _AGENTS if a[2] != 'it')
_FOODS = (('apple', 'apples'), ('cake', 'cakes'), ('egg', 'eggs'), ('orange', 'oranges'),
          ('pie', 'pies'), ('carrot', 'carrots'), ('bread', 'bread'), ('soup', 'soup'),
          ('rice', 'rice'), ('cheese', 'cheese'))
_TEXTS = (('book', 'books'), ('letter', 'letters'), ('poem', 'poems'), ('story', 'stories'),
          ('map', 'maps'), ('newspaper', 'newspapers'))
_PLACES = ('house', 'garden', 'forest', 'river', 'city', 'school', 'market', 'village',
           'park', 'kitchen', 'library', 'field')
_ADJECTIVES = ('big', 'small', 'old', 'young', 'happy', 'sad', 'red', 'brown', 'quick',
               'lazy', 'clever', 'quiet', 'tall', 'brave', 'hungry', 'tired')
_STATES = ('happy', 'sad', 'hungry', 'tired', 'angry', 'cold', 'busy', 'late')
# (3rd person singular, plural).
_INTRANSITIVE = (('runs', 'run'), ('sleeps', 'sleep'), ('sings', 'sing'), ('waits', 'wait'),
                 ('walks', 'walk'), ('laughs', 'laugh'), ('swims', 'swim'),
                 ('dances', 'dance'), ('jumps', 'jump'), ('hides', 'hide'))
_SEE = (('sees', 'see'), ('likes', 'like'), ('follows', 'follow'), ('helps', 'help'),
        ('watches', 'watch'), ('finds', 'find'))
_EAT = (('eats', 'eat'), ('cooks', 'cook'), ('buys', 'buy'), ('sells', 'sell'))
_READ = (('reads', 'read'), ('writes', 'write'), ('opens', 'open'))
_ADVERBS = ('quickly', 'slowly', 'often', 'never', 'always', 'today', 'again', 'quietly')
_PREPOSITIONS = ('near', 'behind', 'with', 'beside', 'under')
_NUMBERS = ('one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten',
            'eleven', 'twelve')
_NAMES = ('ann', 'bob', 'carl', 'dora', 'emma', 'fred', 'gina', 'hugo', 'ida', 'jack')
_SYLLABLES = ('ka', 'lo', 'mi', 'ne', 'ru', 'ta', 'vo', 'zi', 'po', 'se', 'du', 'fa')


class _Generator:
  """Samples sentences; all randomness comes from one `RandomState`."""

  def __init__(self, rng: np.random.RandomState):
    self._rng = rng

  def pick(self, items: Sequence):
    return items[self._rng.randint(len(items))]

  def chance(self, p: float) -> bool:
    return self._rng.random_sample() < p

  def name(self) -> str:
    if self.chance(0.15):  # A rare name, almost always seen < _MIN_COUNT times.
      return ''.join(self.pick(_SYLLABLES) for _ in range(3))
    return self.pick(_NAMES)

  def noun_phrase(self, nouns: Sequence[tuple], plural: bool,
                  adjective: float = 0.3) -> list[str]:
    words = ['the' if not plural or self.chance(0.5) else 'some']
    if self.chance(adjective):
      words.append(self.pick(_ADJECTIVES))
    return words + [self.pick(nouns)[int(plural)]]

  def subject(self, nouns: Sequence[tuple] = _AGENTS) -> tuple[list[str], bool]:
    """Returns (words, whether the subject is plural)."""
    plural = self.chance(0.5)
    noun = self.pick(nouns)
    words = ['the']
    if self.chance(0.3):
      words.append(self.pick(_ADJECTIVES))
    words.append(noun[int(plural)])
    if self.chance(0.25):  # An attractor: "the dog near the cats runs".
      words += [self.pick(_PREPOSITIONS)] + self.noun_phrase(_AGENTS, self.chance(0.5), 0)
    return words, plural

  def intransitive(self) -> list[str]:
    words, plural = self.subject()
    words.append(self.pick(_INTRANSITIVE)[int(plural)])
    if self.chance(0.4):
      words.append(self.pick(_ADVERBS))
    if self.chance(0.3):
      words += ['in', 'the', self.pick(_PLACES)]
    return words + ['.']

  def transitive(self) -> list[str]:
    kind = self._rng.randint(3)
    verbs, objects = ((_SEE, _AGENTS), (_EAT, _FOODS), (_READ, _TEXTS))[kind]
    words, plural = self.subject(_AGENTS if kind == 0 else _PEOPLE)
    words.append(self.pick(verbs)[int(plural)])
    words += self.noun_phrase(objects, self.chance(0.5))
    return words + ['.']

  def there_is(self) -> list[str]:
    count = 1 if self.chance(0.4) else 2 + self._rng.randint(len(_NUMBERS) - 1)
    noun = self.pick(_AGENTS + _FOODS)
    return ['there', 'is' if count == 1 else 'are', _NUMBERS[count - 1],
            noun[int(count > 1)], 'in', 'the', self.pick(_PLACES), '.']

  def counting(self) -> list[str]:
    start = self._rng.randint(len(_NUMBERS) - 2)
    stop = start + 3 + self._rng.randint(min(5, len(_NUMBERS) - start - 2))
    return [self.name(), 'counts'] + list(_NUMBERS[start:stop]) + ['.']

  def because(self) -> list[str]:
    plural = self.chance(0.5)
    person = self.pick(_PEOPLE)
    verb, food = self.pick(_EAT), self.pick(_FOODS)
    pronoun, be = ('they', 'are') if plural else (person[2], 'is')
    return (['the', person[int(plural)], verb[int(plural)]]
            + self.noun_phrase([food], self.chance(0.5), 0)
            + ['because', pronoun, be, self.pick(_STATES), '.'])

  def question(self) -> list[str]:
    words, plural = self.subject()
    return ['do' if plural else 'does'] + words + [self.pick(_INTRANSITIVE)[1], '?']

  def said(self) -> list[str]:
    return [self.name(), 'said', 'that'] + self.intransitive()

  def sentence(self) -> list[str]:
    makers: tuple[Callable[[], list[str]], ...] = (
        self.intransitive, self.transitive, self.transitive, self.there_is,
        self.counting, self.because, self.question, self.said)
    return self.pick(makers)()


def generate_tiny_lines(seed: int = SEED) -> dict[str, list[str]]:
  """Generates the tiny corpus.

  Returns:
    {'train', 'valid', 'test'} -> lines of space-separated words (no '<eos>'), with words
    seen fewer than 3 times in train replaced by '<unk>'.
  """
  gen = _Generator(np.random.RandomState(seed))
  sentences = {split: [gen.sentence() for _ in range(n)]
               for split, n in SPLIT_LINES.items()}
  counts = collections.Counter(w for s in sentences['train'] for w in s)
  keep = {w for w, c in counts.items() if c >= _MIN_COUNT}
  return {split: [' '.join(w if w in keep else UNK for w in s) for s in lines]
          for split, lines in sentences.items()}
