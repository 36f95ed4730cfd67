"""jaxlm: tied word vectors and the augmented loss (Inan et al. 2016) for recurrent LMs in JAX.

  import jaxlm
  model = jaxlm.models.build_model(jaxlm.config.tiny_config(), vocab_size)
  logits, carry = model.apply({'params': params}, tokens, model.initial_carry(batch))
  loss = jaxlm.losses.cross_entropy(logits, targets) + alpha * jaxlm.losses.augmented_kl(
      logits, targets, jaxlm.models.embedding_matrix(params), temperature)
"""

from jaxlm import config
from jaxlm import data
from jaxlm import evaluation
from jaxlm import losses
from jaxlm import models
from jaxlm import train
from jaxlm.errors import UserError

__version__ = '0.1.0'
