"""Corpora, vocabulary and BPTT batching."""

from jaxlm.data.batching import contiguous_run
from jaxlm.data.batching import eval_windows
from jaxlm.data.batching import max_distinct_targets
from jaxlm.data.batching import num_train_windows
from jaxlm.data.batching import train_streams
from jaxlm.data.batching import train_window
from jaxlm.data.corpus import CORPORA
from jaxlm.data.corpus import Corpus
from jaxlm.data.corpus import load_corpus
from jaxlm.data.vocab import EOS
from jaxlm.data.vocab import tokenize_line
from jaxlm.data.vocab import UNK
from jaxlm.data.vocab import Vocabulary

__all__ = [
    'CORPORA', 'Corpus', 'EOS', 'UNK', 'Vocabulary', 'contiguous_run', 'eval_windows', 'load_corpus',
    'max_distinct_targets', 'num_train_windows', 'tokenize_line', 'train_streams', 'train_window',
]
