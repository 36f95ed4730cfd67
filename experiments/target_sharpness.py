"""What the augmented loss's target y~ = softmax(E u / tau) says, for trained runs' E.

  python experiments/target_sharpness.py --workdirs=~/jaxlm-runs/ptb_small_real \
      --temperatures=20,10,5,2 --data_dir=../shared/data

For each workdir's embedding E (its best checkpoint, or --checkpoint=latest) and each
temperature, over the target words of the validation split (each word weighted by how often
it is a target there; with no --data_dir, every vocabulary word once): the mean entropy of y~
in nats, against log V for a uniform y~, and the mean probability y~ gives the target word
itself; and the mean length of the word vectors, over the vocabulary and over the targets.
A y~ as flat as the uniform distribution carries no word similarity: the augmented loss then
only pulls the model's tempered distribution toward uniform, like label smoothing. Prints a
Markdown table.
"""

import os
import sys

from absl import app
from absl import flags
import numpy as np

from jaxlm import inference
from jaxlm import losses
from jaxlm import models
from jaxlm import data as data_lib
from jaxlm.errors import UserError

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Trained workdirs to read E from.')
_TEMPERATURES = flags.DEFINE_list('temperatures', ['20', '10', '5', '2'], 'Values of tau.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'Corpus folder: weight each word by its count as a validation target.')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', inference.CHECKPOINTS,
                                'Which parameters of each workdir.')


def target_counts(trained: inference.Trained, data_dir: str) -> np.ndarray:
  """How often each word of the workdir's vocabulary is a target of the validation split: [V]."""
  config = trained.config
  corpus = data_lib.load_corpus(config.data.corpus, data_dir, config.data.tfds_dir)
  if corpus.vocab != trained.vocab:
    raise UserError(f'the model was trained on another corpus than {config.data.corpus!r} in'
                    f' {data_dir}: pass the --data_dir it was trained on')
  return np.bincount(corpus.splits['valid'][1:], minlength=len(trained.vocab))


def main(argv: list[str]) -> None:
  del argv
  if not _WORKDIRS.value:
    raise UserError('--workdirs=W[,W...] is required: trained workdirs')
  try:
    temperatures = [float(t) for t in _TEMPERATURES.value]
  except ValueError:
    raise UserError(f'--temperatures must be numbers, got {_TEMPERATURES.value}') from None
  if any(t <= 0 for t in temperatures):
    raise UserError(f'--temperatures must be > 0, got {temperatures}')
  rows = ['| run | mean ‖E_w‖ (vocabulary / targets) | tau | entropy of y~ (nats) | log V |'
          ' y~ of the word itself |', '|---|---|---|---|---|---|']
  for workdir in _WORKDIRS.value:
    trained = inference.load_trained(os.path.expanduser(workdir), _CHECKPOINT.value)
    embedding = np.asarray(models.embedding_matrix(trained.params), np.float32)
    weights = np.ones(embedding.shape[0])
    if _DATA_DIR.value:
      weights = target_counts(trained, _DATA_DIR.value)
    norms = np.linalg.norm(embedding.astype(np.float64), axis=1)
    name = os.path.basename(os.path.normpath(workdir))
    for tau in temperatures:
      entropy, self_prob = losses.target_sharpness(embedding, tau, weights)
      rows.append(f'| {name} | {norms.mean():.2f} / {norms @ weights / weights.sum():.2f} |'
                  f' {tau:g} | {entropy:.3f} | {np.log(len(norms)):.3f} | {self_prob:.4f} |')
  print('\n'.join(rows))


def run() -> None:
  try:
    app.run(main)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  run()
