"""Section 6.2 of the paper on Penn Treebank: `configs/ptb_subspace.py`.

A 2-layer 300-unit untied LSTM on a 20,000-word run of PTB train (its start drawn from the
seed), no dropout, embedding rows at norm 1, loss beta tau^2 V J^aug + (1 - beta) J. Its last
line reports `subspace_distance`, between the column spaces of E and W. Sweep with
--config.loss.beta=B --config.loss.temperature=T --config.seed=S (experiments/subspace_sweep.py).
"""

from jaxlm import config


def get_config(arg: str | None = None):
  del arg  # no variants
  return config.subspace_config()
