"""The config schema, the paper's recipes, and the check of a config before training.

`configs/*.py` are thin: each `get_config(arg)` calls one of the recipe functions here, so the
schema (every key a user can override) lives in one place, `base_config`.
"""

import json
import math

import ml_collections
from ml_collections import config_dict

from jaxlm.data import CORPORA
from jaxlm.errors import UserError

SIZES = ('small', 'medium', 'large')
COMPUTE_DTYPES = ('float32', 'bfloat16')
MATMUL_PRECISIONS = ('default', 'high', 'highest', 'bfloat16', 'tensorfloat32', 'float32')
VARIANTS = ('baseline', 'al', 're', 'real')
CORES = ('lstm', 'rhn')

# The VD-LSTM recipe per size (docs/paper.md, "The LSTM recipe"): hidden = embedding size, the
# epoch after which the learning rate decays, the decay multiplier, the clipping norm, the
# drop rate per corpus, the uniform init scale, and the number of epochs.
LSTM_SIZES = {
    'small': dict(hidden=200, decay_start=5, decay=0.9, clip=5.0,
                  drop={'ptb': 0.3, 'wikitext2': 0.2}, init=0.1, epochs=39),
    'medium': dict(hidden=650, decay_start=10, decay=0.9, clip=5.0,
                   drop={'ptb': 0.5, 'wikitext2': 0.4}, init=0.05, epochs=39),
    'large': dict(hidden=1500, decay_start=1, decay=0.97, clip=6.0,
                  drop={'ptb': 0.65, 'wikitext2': 0.65}, init=0.04, epochs=55),
}
# gamma of the augmented loss (its weight alpha = gamma * temperature), per corpus (docs/paper.md,
# "The augmented loss").
AUG_GAMMA = {'ptb': 0.5, 'wikitext2': 1.0, 'tiny': 0.5}
TEMPERATURE = 20.0

# Section 6.2 (docs/paper.md): a 2-layer 300-unit untied LSTM on a 20,000-word run of PTB
# train, no dropout, embedding rows at norm 1, loss beta tau^2 V J^aug + (1 - beta) J. The paper
# gives neither epochs, learning rate nor init; ours (docs/reproduction.md, "Section 6.2"): SGD
# at lr 1 with clip 5 for 6 epochs, after which the distance has settled; the read-out starting at
# zero, so that what is measured is where the loss drives W, not what is left of a random init; y~
# a target (no gradient into E through it), as in the paper's analysis.
SUBSPACE_RECIPE = dict(hidden=300, train_words=20_000, beta=1.0, temperature=10.0, epochs=6,
                       learning_rate=1.0, clip=5.0, readout_init=0.0, eval_max_tokens=5_000)


# The VD-RHN recipe (docs/paper.md, "The RHN recipe"; Zilly et al.'s reference config `ptb_sota`).
RHN_RECIPE = dict(depth=10, hidden=830, init=0.04, transform_bias=-2.0, learning_rate=0.2,
                  decay=1 / 1.02, decay_start=20, epochs=500, weight_decay=1e-7, clip=10.0,
                  drop=dict(embed=0.25, input=0.75, state=0.25, output=0.75))


def base_config() -> ml_collections.ConfigDict:
  """Every key of the schema with its default (the medium VD-LSTM+REAL on PTB)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 20
  c.bptt = 35
  c.eval_batch_size = 10
  c.test_batch_size = 1
  c.eval_max_tokens = config_dict.placeholder(int)  # cap on every evaluation; None: no cap
  c.num_epochs = 39
  c.max_steps = config_dict.placeholder(int)  # stop after this many global train steps
  c.log_every = 100  # steps between `train` lines in metrics.jsonl
  c.checkpoint_every = 500  # steps between saves of the latest state (and at every epoch end)
  # Also save the latest state when this many seconds passed since the last save (checked
  # every log_every steps); 0: only checkpoint_every.
  c.checkpoint_every_secs = 600
  # Monte-Carlo dropout evaluation (docs/paper.md, "The RHN recipe"): each target's probability
  # averaged over `mc_samples` passes with masks drawn once per pass; 0: off. Reported as
  # SPLIT_mc_ppl.
  c.mc_samples = 0
  c.mc_max_ppl = 500.0  # a pass with this perplexity or more is discarded and redrawn
  c.mc_batch = 10  # passes run side by side as the rows of one batch
  # 'reference': as Zilly et al.'s MC evaluation, embeddings scaled by 1 / (1 - dropout.embed)
  # and no word type dropped; 'word_types': the word-type masks of training
  # (evaluation.pass_masks).
  c.mc_embed_masks = 'reference'

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = config_dict.placeholder(int)  # devices on the 'data' axis; None: all of them

  c.data = ml_collections.ConfigDict()
  c.data.corpus = 'ptb'
  c.data.dir = config_dict.placeholder(str)  # local corpus folder; else $JAXLM_DATA_DIR
  c.data.tfds_dir = config_dict.placeholder(str)  # where the TFDS builds go
  # Train on a contiguous run of this many tokens of the train split, its start drawn from
  # `seed` (section 6.2); None: the whole split.
  c.data.train_words = config_dict.placeholder(int)

  c.model = ml_collections.ConfigDict()
  c.model.core = 'lstm'
  c.model.num_layers = 2
  c.model.hidden_size = 650
  c.model.embed_size = 650
  c.model.tied = True
  c.model.output_bias = False
  c.model.init_scale = 0.05
  c.model.readout_init_scale = config_dict.placeholder(float)  # untied read-out; None: init_scale
  c.model.forget_bias_init = 0.0  # LSTM
  c.model.depth = 10  # RHN: micro-layers per time step
  c.model.transform_bias_init = -2.0  # RHN: initial bias of the transform gate T
  c.model.micro_scan = False  # RHN: lax.scan over the micro-layers instead of unrolling them
  c.model.unroll = 1
  # Recurrent layers with a hand-written backward pass that leaves only the recurrent product
  # in the time loop; False: autodiff of lax.scan. Same values and gradients.
  c.model.custom_vjp = True
  c.model.compute_dtype = 'float32'  # or 'bfloat16' (TPUs): matmuls only; parameters stay float32
  c.model.matmul_precision = 'default'  # jax_default_matmul_precision: 'highest' forces float32

  c.dropout = ml_collections.ConfigDict()
  c.dropout.embed = 0.0
  c.dropout.input = 0.5
  c.dropout.state = 0.5
  c.dropout.output = 0.5
  c.dropout.share_state_and_input = True  # LSTM: state mask also drops the output upward
  c.dropout.separate_gate_masks = False  # RHN: own masks for the H and T transforms

  c.loss = ml_collections.ConfigDict()
  # The loss is J + alpha J^aug with alpha = gamma * temperature (the paper's appendix), so an
  # override of the temperature keeps gamma. aug_weight (alpha) is derived: set gamma.
  c.loss.gamma = AUG_GAMMA['ptb']
  c.loss.temperature = TEMPERATURE
  c.loss.aug_weight = c.loss.get_ref('gamma') * c.loss.get_ref('temperature')
  # Section 6.2's weighting instead: beta tau^2 V J^aug + (1 - beta) J, beta in [0, 1] (with
  # gamma = 0); None: off.
  c.loss.beta = config_dict.placeholder(float)
  c.loss.stop_target_gradient = False
  # Whether the model's tempered distribution in the KL keeps the read-out's bias:
  # softmax((W h + b) / tau). False: the paper's softmax(W h / tau) (docs/paper.md, "The
  # read-out's bias"). Matters only for a read-out with a bias (untied, or model.output_bias).
  c.loss.kl_with_bias = False
  c.loss.reduction = 'sum_over_time'
  # CE and KL with a hand-written backward pass (losses.fused_ce_and_kl); False: autodiff of
  # the plain definitions. Same values and gradients.
  c.loss.fused = True

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1.0
  c.optim.lr_decay = 0.9  # lr(e) = learning_rate * lr_decay ** max(0, e - decay_start)
  c.optim.decay_start = 10
  c.optim.clip_norm = 5.0
  c.optim.weight_decay = 0.0  # L2: weight_decay * sum(w^2) / 2 added to the loss
  c.optim.unit_norm_embedding = False  # rows of E scaled to norm 1 at init and after each update
  return c


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A workdir's config.json over the schema's defaults, so that keys added since keep theirs.

  Older workdirs saved alpha (`loss.aug_weight`) but not gamma; gamma = alpha / temperature.
  Those from before `loss.kl_with_bias` kept the read-out's bias in the KL: where that
  mattered (an augmented loss and a read-out with a bias), they resume so.
  """
  saved = json.loads(json.dumps(saved))  # a deep copy
  loss = saved.get('loss', {})
  alpha = loss.pop('aug_weight', None)
  if 'gamma' not in loss and alpha is not None:
    loss['gamma'] = alpha / loss.get('temperature', TEMPERATURE)
  model = saved.get('model', {})
  has_bias = model.get('output_bias') or not model.get('tied', True)
  with_kl = loss.get('gamma', 0) > 0 or loss.get('beta') is not None
  if has_bias and with_kl:
    loss.setdefault('kl_with_bias', True)
  c = base_config()
  c.update(saved)
  return c


def flat_dict(c: ml_collections.ConfigDict) -> dict:
  """{'dotted.key': value} of every leaf of `c`."""
  def flatten(tree, prefix):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from flatten(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value
  return dict(flatten(c.to_dict(), ''))


def differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict,
                ignore: frozenset = frozenset()) -> list[str]:
  """The dotted keys, outside `ignore`, whose values differ between `a` and `b`."""
  flat_a, flat_b = flat_dict(a), flat_dict(b)
  return sorted(k for k in flat_a.keys() | flat_b.keys()
                if k not in ignore and flat_a.get(k) != flat_b.get(k))


def parse_arg(arg: str | None, default: str) -> tuple[str, str]:
  """'SIZE[,VARIANT]' -> (size, variant); the missing parts come from `default`."""
  size, variant = default.split(',')
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  if len(parts) > 2:
    raise UserError(f'config argument {arg!r} has too many parts; expected SIZE[,VARIANT]')
  for part in parts:
    if part in SIZES:
      size = part
    elif part in VARIANTS:
      variant = part
    else:
      raise UserError(
          f'unknown config argument {part!r}: expected a size {SIZES} and/or a variant'
          f' {VARIANTS}, e.g. configs/ptb_lstm.py:small,re'
      )
  return size, variant


def apply_variant(c: ml_collections.ConfigDict, variant: str, corpus: str) -> None:
  """baseline: untied, no AL; al: untied + AL; re: tied; real: tied + AL (in place)."""
  c.model.tied = variant in ('re', 'real')
  c.loss.gamma = AUG_GAMMA[corpus] if variant in ('al', 'real') else 0.0


def lstm_config(corpus: str, arg: str | None) -> ml_collections.ConfigDict:
  """The paper's VD-LSTM row `arg` = 'SIZE[,VARIANT]' (default 'medium,real') on `corpus`."""
  size, variant = parse_arg(arg, 'medium,real')
  recipe = LSTM_SIZES[size]
  c = base_config()
  c.data.corpus = corpus
  c.num_epochs = recipe['epochs']
  c.model.hidden_size = c.model.embed_size = recipe['hidden']
  c.model.init_scale = recipe['init']
  drop = recipe['drop'][corpus]
  c.dropout.input = c.dropout.state = c.dropout.output = drop
  c.optim.decay_start = recipe['decay_start']
  c.optim.lr_decay = recipe['decay']
  c.optim.clip_norm = recipe['clip']
  apply_variant(c, variant, corpus)
  return c


def parse_variant(arg: str | None, default: str, example: str) -> str:
  """'VARIANT' (or nothing) -> the variant; for recipes without sizes."""
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  if len(parts) > 1 or (parts and parts[0] not in VARIANTS):
    raise UserError(f'unknown config argument {arg!r}: expected one variant of {VARIANTS},'
                    f' e.g. {example}')
  return parts[0] if parts else default


def rhn_config(corpus: str, arg: str | None) -> ml_collections.ConfigDict:
  """The VD-RHN recipe (depth 10, 830 units) on `corpus`; `arg` = VARIANT, default 're'.

  re is the paper's row (tied, with the reference's output bias); real adds the augmented
  loss; baseline unties the read-out.
  """
  variant = parse_variant(arg, 're', 'configs/ptb_rhn.py:real')
  r = RHN_RECIPE
  c = base_config()
  c.data.corpus = corpus
  c.num_epochs = r['epochs']
  c.model.core = 'rhn'
  c.model.num_layers = 1
  c.model.depth = r['depth']
  c.model.hidden_size = c.model.embed_size = r['hidden']
  c.model.init_scale = r['init']
  c.model.transform_bias_init = r['transform_bias']
  c.model.output_bias = True
  for key, rate in r['drop'].items():
    c.dropout[key] = rate
  c.dropout.share_state_and_input = False  # an LSTM option; the RHN has its own `output` rate
  c.optim.learning_rate = r['learning_rate']
  c.optim.lr_decay = r['decay']
  c.optim.decay_start = r['decay_start']
  c.optim.clip_norm = r['clip']
  c.optim.weight_decay = r['weight_decay']
  apply_variant(c, variant, corpus)
  return c


def subspace_config() -> ml_collections.ConfigDict:
  """Section 6.2's experiment on PTB (`SUBSPACE_RECIPE`); sweep --config.loss.beta and
  --config.loss.temperature. The run reports `subspace_distance` between E and W."""
  r = SUBSPACE_RECIPE
  c = base_config()
  c.num_epochs = r['epochs']
  c.eval_max_tokens = r['eval_max_tokens']  # perplexity is not what this run measures
  c.data.train_words = r['train_words']
  c.model.hidden_size = c.model.embed_size = r['hidden']
  c.model.tied = False
  c.model.readout_init_scale = r['readout_init']
  for key in ('embed', 'input', 'state', 'output'):
    c.dropout[key] = 0.0
  c.loss.gamma = 0.0
  c.loss.beta = r['beta']
  c.loss.temperature = r['temperature']
  c.loss.stop_target_gradient = True
  c.optim.learning_rate = r['learning_rate']
  c.optim.lr_decay = 1.0
  c.optim.clip_norm = r['clip']
  c.optim.unit_norm_embedding = True
  return c


def tiny_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """A tied LSTM+REAL of 32 units on the generated tiny corpus: trains in seconds on a CPU.

  `arg` = '[CORE,][VARIANT]': CORE 'rhn' gives a 32-unit RHN of depth 3 instead.
  """
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  core = 'rhn' if 'rhn' in parts else 'lstm'
  _, variant = parse_arg(','.join(p for p in parts if p not in CORES), 'small,real')
  c = base_config()
  c.data.corpus = 'tiny'
  c.batch_size = 8
  c.bptt = 10
  c.eval_batch_size = 8
  c.test_batch_size = 1
  c.num_epochs = 3
  c.log_every = 20
  c.checkpoint_every = 100
  c.model.num_layers = 2
  c.model.hidden_size = c.model.embed_size = 32
  c.model.init_scale = 0.1
  c.dropout.input = c.dropout.state = c.dropout.output = 0.1
  c.optim.decay_start = 2
  c.optim.lr_decay = 0.5
  if core == 'rhn':
    c.model.core = 'rhn'
    c.model.num_layers = 1
    c.model.depth = 3
    c.model.output_bias = True
    c.dropout.embed = 0.05
    c.dropout.share_state_and_input = False
    c.optim.weight_decay = 1e-7
  apply_variant(c, variant, 'tiny')
  return c


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise UserError(message)


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises UserError, one line naming the key and the fix, for an impossible config."""
  for key in ('batch_size', 'bptt', 'eval_batch_size', 'test_batch_size', 'log_every',
              'checkpoint_every'):
    _check(c[key] > 0, f'config.{key} must be > 0, got {c[key]}')
  _check(c.num_epochs >= 0, f'config.num_epochs must be >= 0, got {c.num_epochs}')
  _check(c.checkpoint_every_secs >= 0, 'config.checkpoint_every_secs must be >= 0 (0: saves'
         f' every checkpoint_every steps only), got {c.checkpoint_every_secs}')
  for key in ('max_steps', 'eval_max_tokens'):
    _check(c[key] is None or c[key] > 0, f'config.{key} must be > 0 (or unset), got {c[key]}')
  _check(c.mc_samples >= 0, f'config.mc_samples must be >= 0 (0: no MC evaluation), got'
         f' {c.mc_samples}')
  _check(c.mc_max_ppl > 0, f'config.mc_max_ppl must be > 0, got {c.mc_max_ppl}')
  _check(c.mc_batch > 0, f'config.mc_batch must be > 0, got {c.mc_batch}')
  _check(c.mc_embed_masks in ('reference', 'word_types'), "config.mc_embed_masks must be"
         f" 'reference' or 'word_types', got {c.mc_embed_masks!r}")
  _check(c.data.corpus in CORPORA,
         f'config.data.corpus must be one of {CORPORA}, got {c.data.corpus!r}')

  m = c.model
  _check(m.core in CORES, f'config.model.core must be one of {CORES}, got {m.core!r}')
  for key in ('num_layers', 'hidden_size', 'embed_size', 'depth', 'unroll'):
    _check(m[key] > 0, f'config.model.{key} must be > 0, got {m[key]}')
  _check(m.init_scale > 0, f'config.model.init_scale must be > 0, got {m.init_scale}')
  _check(m.compute_dtype in COMPUTE_DTYPES,
         f'config.model.compute_dtype must be one of {COMPUTE_DTYPES}, got {m.compute_dtype!r}')
  _check(m.matmul_precision in MATMUL_PRECISIONS,
         f'config.model.matmul_precision must be one of {MATMUL_PRECISIONS},'
         f' got {m.matmul_precision!r}')
  _check(
      not m.tied or m.hidden_size == m.embed_size,
      f'a tied model needs model.hidden_size == model.embed_size, got {m.hidden_size} and'
      f' {m.embed_size}: set both, or --config.model.tied=False',
  )

  for key in ('embed', 'input', 'state', 'output'):
    rate = c.dropout[key]
    _check(0.0 <= rate < 1.0, f'config.dropout.{key} is a drop probability in [0, 1), got {rate}')
  _check(
      m.core != 'lstm' or not c.dropout.share_state_and_input
      or c.dropout.output == c.dropout.state,
      f'config.dropout.output ({c.dropout.output}) is unused while'
      f' dropout.share_state_and_input is true (the output takes the state mask of rate'
      f' {c.dropout.state}): set it equal to dropout.state, or share_state_and_input=False',
  )

  loss = c.loss
  _check(loss.temperature > 0, f'config.loss.temperature must be > 0, got {loss.temperature}')
  _check(loss.gamma >= 0, f'config.loss.gamma must be >= 0 (0: no augmented loss), got'
         f' {loss.gamma}')
  _check(math.isclose(loss.aug_weight, loss.gamma * loss.temperature, rel_tol=1e-12, abs_tol=0),
         f'config.loss.aug_weight ({loss.aug_weight}) is derived as gamma * temperature'
         f' ({loss.gamma} * {loss.temperature}): set config.loss.gamma instead')
  if loss.beta is not None:
    _check(0.0 <= loss.beta <= 1.0, f'config.loss.beta must be in [0, 1], got {loss.beta}')
    _check(loss.gamma == 0, f'config.loss.beta weights both losses itself (section 6.2): set'
           f' config.loss.gamma=0, or unset beta, got gamma {loss.gamma}')
  _check(loss.reduction in ('sum_over_time', 'mean'),
         f"config.loss.reduction must be 'sum_over_time' or 'mean', got {loss.reduction!r}")

  o = c.optim
  _check(o.learning_rate > 0, f'config.optim.learning_rate must be > 0, got {o.learning_rate}')
  _check(0 < o.lr_decay <= 1, f'config.optim.lr_decay must be in (0, 1], got {o.lr_decay}')
  _check(o.clip_norm > 0, f'config.optim.clip_norm must be > 0, got {o.clip_norm}')
  _check(o.weight_decay >= 0, f'config.optim.weight_decay must be >= 0, got {o.weight_decay}')
  _check(c.data.train_words is None or c.data.train_words > 0,
         f'config.data.train_words must be > 0 (or unset: the whole split), got'
         f' {c.data.train_words}')
