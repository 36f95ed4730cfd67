"""Tests of jaxlm.data: batching, vocabulary, corpora (real PTB/WikiText-2 and tiny)."""

import collections
import gzip
import pathlib

import numpy as np
import pytest

from jaxlm import data
from jaxlm.data import tiny
from jaxlm.errors import UserError
from tests.conftest import require_corpus


PTB_TOKENS = {'train': 929_589, 'valid': 73_760, 'test': 82_430}
PTB_LINES = {'train': 42_068, 'valid': 3_370, 'test': 3_761}
WT2_TOKENS = {'train': 2_088_628, 'valid': 217_646, 'test': 245_569}
WT2_LINES = {'train': 36_718, 'valid': 3_760, 'test': 4_358}


def read_lines(path: pathlib.Path) -> list[str]:
  """Reference reader: the lines of a gzipped UTF-8 file."""
  with gzip.open(path, 'rt', encoding='utf-8', newline='\n') as f:
    return [line[:-1] for line in f]


def reference_tokens(path: pathlib.Path) -> list[str]:
  return [w for line in read_lines(path) for w in line.split() + ['<eos>']]


# ---------------------------------------------------------------------------------------
# Batching.


@pytest.mark.parametrize('n,batch,bptt', [(103, 4, 5), (1000, 20, 35), (50, 1, 7),
                                          (64, 8, 1), (36, 5, 6)])
def test_train_windows_round_trip(n, batch, bptt):
  ids = np.random.RandomState(n).randint(0, 1000, size=n)
  streams = data.train_streams(ids, batch)
  length = n // batch
  assert streams.shape == (batch, length) and streams.dtype == np.int32
  for b in range(batch):
    np.testing.assert_array_equal(streams[b], ids[b * length:(b + 1) * length])

  num = data.num_train_windows(streams, bptt)
  assert num == (length - 1) // bptt
  windows = [data.train_window(streams, i, bptt) for i in range(num)]
  for inputs, targets in windows:
    assert inputs.shape == targets.shape == (batch, bptt)
    assert inputs.dtype == targets.dtype == np.int32
  inputs = np.concatenate([w[0] for w in windows], axis=1)
  targets = np.concatenate([w[1] for w in windows], axis=1)
  np.testing.assert_array_equal(inputs, streams[:, :num * bptt])
  np.testing.assert_array_equal(targets, streams[:, 1:num * bptt + 1])
  with pytest.raises(IndexError):
    data.train_window(streams, num, bptt)


def test_train_streams_errors():
  with pytest.raises(UserError, match='batch_size'):
    data.train_streams(np.arange(10), 0)
  with pytest.raises(UserError, match='too short'):
    data.train_streams(np.arange(10), 6)
  with pytest.raises(UserError, match='bptt'):
    data.num_train_windows(np.zeros((2, 10)), 0)


def weighted_pairs(inputs, targets, weights):
  """(input, target) pairs with weight 1, stream by stream, in time order."""
  num_windows, batch, bptt = weights.shape
  pairs = []
  for b in range(batch):
    for w in range(num_windows):
      for t in range(bptt):
        if weights[w, b, t]:
          pairs.append((int(inputs[w, b, t]), int(targets[w, b, t])))
  return pairs


@pytest.mark.parametrize('batch', [1, 3, 10, 20])
@pytest.mark.parametrize('n,bptt', [(1000, 35), (1000, 7), (997, 1), (2, 35), (11, 3),
                                    (21, 4), (100, 100)])
def test_eval_windows_predict_each_token_once(n, batch, bptt):
  rng = np.random.RandomState(n * 100 + batch)
  for ids in (rng.permutation(n),  # Distinct ids: pairs identify positions.
              rng.randint(0, 5, size=n)):  # Repeated ids: multiset check.
    inputs, targets, weights = data.eval_windows(ids, batch, bptt)
    num_windows = -(-(-(-(n - 1) // batch)) // bptt)  # ceil(ceil((n-1)/batch)/bptt)
    assert inputs.shape == targets.shape == weights.shape == (num_windows, batch, bptt)
    assert inputs.dtype == np.int32 and targets.dtype == np.int32
    assert weights.dtype == np.float32
    assert set(np.unique(weights)) <= {0.0, 1.0}
    assert weights.sum() == n - 1
    expected = [(int(a), int(b)) for a, b in zip(ids[:-1], ids[1:])]
    got = weighted_pairs(inputs, targets, weights)
    assert got == expected  # Same sequence, hence same multiset, each pair once.
    assert collections.Counter(got) == collections.Counter(expected)
    # Padding is id 0.
    assert not inputs[weights == 0].any() and not targets[weights == 0].any()


def test_eval_windows_streams_overlap_by_one_token():
  ids = np.arange(1, 31)  # 29 targets, 3 streams of 10 (the last has 9).
  inputs, targets, weights = data.eval_windows(ids, 3, 4)
  rows_in = inputs.transpose(1, 0, 2).reshape(3, -1)
  rows_tgt = targets.transpose(1, 0, 2).reshape(3, -1)
  np.testing.assert_array_equal(rows_in[:, 0], [1, 11, 21])
  np.testing.assert_array_equal(rows_tgt[0, :10], np.arange(2, 12))
  assert rows_tgt[0, 9] == rows_in[1, 0]  # Stream 0's last target is stream 1's input.
  np.testing.assert_array_equal(weights.transpose(1, 0, 2).reshape(3, -1).sum(1),
                                [10, 10, 9])


@pytest.mark.parametrize('max_tokens', [1, 50, 998, 999, 5000])
def test_eval_windows_max_tokens(max_tokens):
  ids = np.random.RandomState(0).permutation(1000)
  inputs, targets, weights = data.eval_windows(ids, 3, 7, max_tokens=max_tokens)
  num_targets = min(max_tokens, len(ids) - 1)
  assert weights.sum() == num_targets
  expected = [(int(a), int(b)) for a, b in zip(ids[:num_targets], ids[1:num_targets + 1])]
  assert weighted_pairs(inputs, targets, weights) == expected


def test_eval_windows_errors():
  with pytest.raises(UserError, match='batch_size'):
    data.eval_windows(np.arange(10), 0, 5)
  with pytest.raises(UserError, match='bptt'):
    data.eval_windows(np.arange(10), 2, 0)
  with pytest.raises(UserError, match='at least 2 tokens'):
    data.eval_windows(np.arange(1), 2, 5)
  with pytest.raises(UserError, match='max_tokens'):
    data.eval_windows(np.arange(10), 2, 5, max_tokens=0)


# ---------------------------------------------------------------------------------------
# Vocabulary.


def test_tokenize_line():
  assert data.tokenize_line(' The cat  sat\t') == ['The', 'cat', 'sat', '<eos>']
  assert data.tokenize_line('') == ['<eos>']
  assert data.tokenize_line(' ') == ['<eos>']
  assert data.EOS == '<eos>' and data.UNK == '<unk>'


def test_vocabulary_order_is_count_then_first_appearance():
  lines = [['b', 'a', 'c', 'a', '<eos>'], ['c', 'd', 'e', '<eos>'], ['e', '<eos>']]
  vocab = data.Vocabulary.build(lines)
  # Counts: <eos> 3; a, c, e 2 (first seen in that order); b, d 1.
  assert vocab.words == ('<eos>', 'a', 'c', 'e', 'b', 'd')
  assert len(vocab) == 6
  assert vocab.id('a') == 1 and vocab.id('<eos>') == 0
  assert 'd' in vocab and 'z' not in vocab
  assert vocab == data.Vocabulary.build(iter(lines))
  assert vocab != data.Vocabulary.build(lines[::-1])
  with pytest.raises(UserError, match="'z'"):
    vocab.id('z')


def test_vocabulary_save_load_round_trip(tmp_path):
  vocab = data.Vocabulary.build([['ünï', 'x', 'ünï', '<unk>', '<eos>'], ['戦場', '<eos>']])
  path = tmp_path / 'vocab.txt'
  vocab.save(path)
  assert path.read_text(encoding='utf-8') == ''.join(w + '\n' for w in vocab.words)
  loaded = data.Vocabulary.load(path)
  assert loaded == vocab and loaded.words == vocab.words
  with pytest.raises(UserError, match='does not exist'):
    data.Vocabulary.load(tmp_path / 'missing.txt')


def test_vocabulary_encode_decode():
  vocab = data.Vocabulary.build([['a', 'b', 'a', '<unk>', '<eos>']])
  ids, num_oov = vocab.encode(['a', 'b', '<eos>'])
  assert ids.dtype == np.int32 and num_oov == 0
  assert vocab.decode(ids) == ['a', 'b', '<eos>']
  ids, num_oov = vocab.encode(['a', 'zz', 'b', 'yy', 'zz'])
  assert num_oov == 3
  assert vocab.decode(ids) == ['a', '<unk>', 'b', '<unk>', '<unk>']
  assert vocab.encode([])[0].shape == (0,)


def test_vocabulary_encode_without_unk_raises():
  vocab = data.Vocabulary.build([['a', 'b', '<eos>']])
  with pytest.raises(UserError, match="'zz'.*'<unk>'"):
    vocab.encode(['a', 'zz', 'b'])


# ---------------------------------------------------------------------------------------
# Real corpora (built once per module in a temporary TFDS folder).


@pytest.fixture(scope='module')
def ptb(real_data, tfds_dir):
  return data.load_corpus('ptb', data_dir=real_data, tfds_dir=tfds_dir)


@pytest.fixture(scope='module')
def wikitext2(real_data, tfds_dir):
  require_corpus(real_data, 'wikitext2')
  return data.load_corpus('wikitext2', data_dir=real_data, tfds_dir=tfds_dir)


@pytest.mark.slow
def test_ptb(ptb, real_data, tfds_dir):
  assert isinstance(ptb, data.Corpus)
  assert len(ptb.vocab) == 10_000
  assert '<unk>' in ptb.vocab and 'N' in ptb.vocab
  eos = ptb.vocab.id('<eos>')
  for split in ('train', 'valid', 'test'):
    ids = ptb.splits[split]
    assert ids.dtype == np.int32 and ids.shape == (PTB_TOKENS[split],)
    assert (ids == eos).sum() == PTB_LINES[split]
    # Every token, in file order (hence line order), against an independent reading.
    path = real_data / 'ptb' / f'ptb.{split}.txt.gz'
    assert ptb.vocab.decode(ids) == reference_tokens(path)
  first_line = read_lines(real_data / 'ptb' / 'ptb.train.txt.gz')[0]
  first = ptb.splits['train'][:np.argmax(ptb.splits['train'] == eos)]
  assert ' '.join(ptb.vocab.decode(first)) == first_line.strip()
  # The TFDS dataset was written where asked.
  assert (tfds_dir / 'penn_treebank' / '1.0.0' / 'dataset_info.json').is_file()


@pytest.mark.slow
def test_ptb_vocabulary_order(ptb, real_data):
  tokens = reference_tokens(real_data / 'ptb' / 'ptb.train.txt.gz')
  counts = collections.Counter(tokens)
  first_seen = {}
  for i, w in enumerate(tokens):
    first_seen.setdefault(w, i)
  expected = sorted(counts, key=lambda w: (-counts[w], first_seen[w]))
  assert ptb.vocab.words == tuple(expected)
  assert ptb.vocab.words[:3] == ('the', '<unk>', '<eos>')


@pytest.mark.slow
def test_ptb_second_load_reuses_tfds_data(ptb, tfds_dir, tmp_path, monkeypatch):
  # The source files are not needed once the TFDS dataset exists...
  monkeypatch.delenv('JAXLM_DATA_DIR', raising=False)
  (tmp_path / 'empty').mkdir()
  for data_dir in (None, tmp_path / 'empty'):
    again = data.load_corpus('ptb', data_dir=data_dir, tfds_dir=tfds_dir)
    assert again.vocab == ptb.vocab
    for split in ptb.splits:
      np.testing.assert_array_equal(again.splits[split], ptb.splits[split])
  # ...but a folder named that does not exist is a mistake, said in one line.
  with pytest.raises(UserError, match=r'PTB data folder .*nothing \(from --config.data.dir\)'
                     r' does not exist: fix the path, or leave data.dir unset'):
    data.load_corpus('ptb', data_dir=tmp_path / 'nothing', tfds_dir=tfds_dir)


@pytest.mark.slow
def test_wikitext2(wikitext2, real_data):
  assert len(wikitext2.vocab) == 33_278
  eos = wikitext2.vocab.id('<eos>')
  for split in ('train', 'valid', 'test'):
    ids = wikitext2.splits[split]
    assert ids.shape == (WT2_TOKENS[split],)
    assert (ids == eos).sum() == WT2_LINES[split]
  tokens = reference_tokens(real_data / 'wikitext-2' / 'wiki.valid.tokens.gz')
  assert wikitext2.vocab.decode(wikitext2.splits['valid']) == tokens
  train = wikitext2.vocab.decode(wikitext2.splits['train'][:200])
  assert train[:6] == ['<eos>', '=', 'Valkyria', 'Chronicles', 'III', '=']
  assert '戦場のヴァルキュリア3' in train  # UTF-8 decoded.


@pytest.mark.slow
def test_data_dir_from_environment(ptb, real_data, tmp_path, monkeypatch):
  monkeypatch.setenv('JAXLM_DATA_DIR', str(real_data))  # The parent of ptb/.
  corpus = data.load_corpus('ptb', tfds_dir=tmp_path)
  assert corpus.vocab == ptb.vocab
  np.testing.assert_array_equal(corpus.splits['test'], ptb.splits['test'])


@pytest.mark.slow
def test_plain_files_with_short_names(ptb, real_data, tmp_path, monkeypatch):
  monkeypatch.setenv('JAXLM_DATA_DIR', str(tmp_path / 'ignored'))  # data_dir wins.
  folder = tmp_path / 'src'
  folder.mkdir()
  for split in ('train', 'valid', 'test'):
    with gzip.open(real_data / 'ptb' / f'ptb.{split}.txt.gz', 'rb') as f:
      (folder / f'{split}.txt').write_bytes(f.read())
  corpus = data.load_corpus('ptb', data_dir=str(folder), tfds_dir=tmp_path / 'tfds')
  assert corpus.vocab == ptb.vocab
  np.testing.assert_array_equal(corpus.splits['valid'], ptb.splits['valid'])


def assert_helpful(error: pytest.ExceptionInfo, path) -> None:
  message = str(error.value)
  assert '\n' not in message
  assert str(path) in message
  assert '--config.data.dir' in message and 'JAXLM_DATA_DIR' in message


def test_missing_data_folder(tmp_path):
  missing = tmp_path / 'no_such_folder'
  with pytest.raises(UserError, match='does not exist') as error:
    data.load_corpus('ptb', data_dir=missing, tfds_dir=tmp_path / 'tfds')
  assert_helpful(error, missing)


def test_missing_data_folder_from_environment(tmp_path, monkeypatch):
  missing = tmp_path / 'no_such_folder'
  monkeypatch.setenv('JAXLM_DATA_DIR', str(missing))
  with pytest.raises(UserError, match='from JAXLM_DATA_DIR') as error:
    data.load_corpus('wikitext2', tfds_dir=tmp_path / 'tfds')
  assert_helpful(error, missing)


@pytest.mark.parametrize('present', [(), ('ptb.train.txt', 'ptb.valid.txt')])
def test_folder_without_files(tmp_path, present):
  folder = tmp_path / 'src'
  folder.mkdir()
  for name in present:
    (folder / name).write_text('a b\n')
  with pytest.raises(UserError, match='No PTB files') as error:
    data.load_corpus('ptb', data_dir=folder, tfds_dir=tmp_path / 'tfds')
  assert_helpful(error, folder)
  assert not (tmp_path / 'tfds' / 'penn_treebank' / '1.0.0').exists()


@pytest.mark.parametrize('gz', [False, True])
def test_corrupted_file(tmp_path, gz):
  folder = tmp_path / 'wikitext-2'
  folder.mkdir()
  for split in ('train', 'valid', 'test'):
    text = f' = A wrong {split} file = \n'.encode()
    if gz:
      (folder / f'wiki.{split}.tokens.gz').write_bytes(gzip.compress(text))
    else:
      (folder / f'wiki.{split}.tokens').write_bytes(text)
  with pytest.raises(UserError, match='md5') as error:
    data.load_corpus('wikitext2', data_dir=tmp_path, tfds_dir=tmp_path / 'tfds')
  assert_helpful(error, folder / ('wiki.train.tokens' + ('.gz' if gz else '')))
  # Nothing half-built is left behind to be reused later.
  assert not (tmp_path / 'tfds' / 'wiki_text2' / '1.0.0').exists()


def test_unknown_corpus(tmp_path):
  with pytest.raises(UserError, match='ptb, wikitext2, tiny'):
    data.load_corpus('penn', tfds_dir=tmp_path)
  assert data.CORPORA == ('ptb', 'wikitext2', 'tiny')


# ---------------------------------------------------------------------------------------
# The tiny corpus.

TINY_TOKENS = {'train': 31_360, 'valid': 4_167, 'test': 4_207}


def test_tiny_corpus(tmp_path, monkeypatch):
  monkeypatch.delenv('JAXLM_DATA_DIR', raising=False)  # Needs no data at all.
  first = data.load_corpus('tiny', tfds_dir=tmp_path / 'a')
  second = data.load_corpus('tiny', tfds_dir=tmp_path / 'b')
  assert first.vocab == second.vocab
  for split in ('train', 'valid', 'test'):
    np.testing.assert_array_equal(first.splits[split], second.splits[split])
    assert first.splits[split].shape == (TINY_TOKENS[split],)
    assert (first.splits[split] == first.vocab.id('<eos>')).sum() == tiny.SPLIT_LINES[split]
  assert len(first.vocab) == 196
  assert '<unk>' in first.vocab
  assert (first.splits['train'] == first.vocab.id('<unk>')).sum() > 0


def test_a_corpus_built_by_another_process_meanwhile_is_read(tmp_path, monkeypatch):
  """Two runs started together build the same TFDS folder; the one whose rename into place
  fails (FileExistsError) reads the other's."""
  expected = data.load_corpus('tiny', tfds_dir=tmp_path / 'alone')
  builder_class = type(data.corpus._BUILDERS['tiny'](data_dir=str(tmp_path)))
  original = builder_class.download_and_prepare

  def lose_the_race(self, *args, **kwargs):
    original(self, *args, **kwargs)  # the other process's build, finished first
    raise FileExistsError('Cannot rename ... already exists.')

  monkeypatch.setattr(builder_class, 'download_and_prepare', lose_the_race)
  got = data.load_corpus('tiny', tfds_dir=tmp_path / 'raced')
  assert got.vocab == expected.vocab
  for split in ('train', 'valid', 'test'):
    np.testing.assert_array_equal(got.splits[split], expected.splits[split])

  def fail(self, *args, **kwargs):  # nothing was built: the error is not ours to hide
    raise FileExistsError('something else')

  monkeypatch.setattr(builder_class, 'download_and_prepare', fail)
  with pytest.raises(FileExistsError, match='something else'):
    data.load_corpus('tiny', tfds_dir=tmp_path / 'failed')


def test_tiny_lines_have_structure():
  lines = tiny.generate_tiny_lines()
  assert lines == tiny.generate_tiny_lines()
  assert lines != tiny.generate_tiny_lines(seed=1)
  train_words = {w for line in lines['train'] for w in line.split()}
  for split in ('valid', 'test'):  # No out-of-vocabulary words.
    assert {w for line in lines[split] for w in line.split()} <= train_words
  for line in lines['train']:
    words = line.split()
    if words[0] == 'there':
      assert (words[1] == 'is') == (words[2] == 'one'), line
    if 'counts' in words:
      numbers = words[words.index('counts') + 1:-1]
      assert ' '.join(numbers) in ' '.join(tiny._NUMBERS), line

  # A bigram model already beats a unigram model by far on valid.
  corpus_lines = {s: [data.tokenize_line(l) for l in lines[s]] for s in lines}
  vocab = data.Vocabulary.build(corpus_lines['train'])
  train, _ = vocab.encode([w for l in corpus_lines['train'] for w in l])
  valid, _ = vocab.encode([w for l in corpus_lines['valid'] for w in l])
  counts = np.full((len(vocab), len(vocab)), 0.1)
  np.add.at(counts, (train[:-1], train[1:]), 1)
  bigram = counts / counts.sum(1, keepdims=True)
  unigram = (np.bincount(train, minlength=len(vocab)) + 1) / (len(train) + len(vocab))
  bigram_ppl = np.exp(-np.log(bigram[valid[:-1], valid[1:]]).mean())
  unigram_ppl = np.exp(-np.log(unigram[valid[1:]]).mean())
  assert bigram_ppl < 12 and unigram_ppl > 4 * bigram_ppl


def test_contiguous_run_is_a_slice_drawn_from_the_seed():
  ids = np.arange(1000)
  runs = {seed: data.contiguous_run(ids, 100, seed) for seed in range(5)}
  for seed, run in runs.items():
    assert len(run) == 100 and np.all(np.diff(run) == 1)  # contiguous: a slice of ids
    np.testing.assert_array_equal(run, data.contiguous_run(ids, 100, seed))  # reproducible
  assert len({int(run[0]) for run in runs.values()}) > 1  # the start depends on the seed
  np.testing.assert_array_equal(data.contiguous_run(ids, 1000, 3), ids)
  with pytest.raises(UserError, match='longer than the train split'):
    data.contiguous_run(ids, 1001, 0)
