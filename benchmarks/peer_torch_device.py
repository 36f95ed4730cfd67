"""The PyTorch peer on any torch device: a 2-layer tied LSTM LM train step, timed.

The model and step of `../shared/bench/peer_torch_lstm.py` (embedding, 2-layer `nn.LSTM` with
dropout 0.5 between the layers, dropout on its input and output, tied read-out with a bias,
cross-entropy, backward, global-norm clip at 5, SGD at 1.0) on random token ids, vocabulary
10,000, on `$JAXLM_PEER_DEVICE` (default: `cuda` when torch sees a GPU, else `cpu`) in
`$JAXLM_PEER_DTYPE` (`float32`, default, or `bfloat16`: the model's parameters and state cast
to bfloat16, the loss in float32; not `torch.autocast`, whose cuDNN RNN wrapper may cast to
float16 instead). On a GPU float32 products run in TF32
(`torch.set_float32_matmul_precision('high')`; cuDNN allows TF32 by default), as jax's default
precision does there (`model.matmul_precision='default'`). The clock is read only after the
device has finished (`torch.cuda.synchronize`).

On a GPU `nn.LSTM` runs cuDNN's fused LSTM, which has no dropout on the recurrent state; the CPU
peer has none either. jaxlm's variational dropout masks the state as well, so jaxlm does a
little more work per step than either peer.

  python benchmarks/peer_torch_device.py HIDDEN BPTT BATCH STEPS
  # torch cuda float32 h=650 bptt=35 batch=20: N tokens/s, M ms/step

`benchmarks/train_step.py --peer --peer_script=benchmarks/peer_torch_device.py` runs it.
"""
import os
import sys
import time

import torch
from torch import nn

VOCAB = 10000


class LM(nn.Module):

  def __init__(self, hidden: int):
    super().__init__()
    self.emb = nn.Embedding(VOCAB, hidden)
    self.rnn = nn.LSTM(hidden, hidden, 2, dropout=0.5)
    self.out = nn.Linear(hidden, VOCAB)
    self.out.weight = self.emb.weight
    self.drop = nn.Dropout(0.5)

  def forward(self, x, state):
    y, state = self.rnn(self.drop(self.emb(x)), state)
    return self.out(self.drop(y)), state


def logits_dtype(model: LM, x: torch.Tensor, state) -> torch.dtype:
  """The dtype the model's forward pass computes in (the LSTM's and read-out's output)."""
  with torch.no_grad():
    return model(x, state)[0].dtype


def main(argv: list[str]) -> None:
  if len(argv) != 5:
    sys.exit(f'usage: {argv[0]} HIDDEN BPTT BATCH STEPS')
  hidden, bptt, batch, steps = (int(a) for a in argv[1:])
  device = os.environ.get('JAXLM_PEER_DEVICE') or ('cuda' if torch.cuda.is_available() else 'cpu')
  dtype = os.environ.get('JAXLM_PEER_DTYPE', 'float32')
  if dtype not in ('float32', 'bfloat16'):
    sys.exit(f'JAXLM_PEER_DTYPE={dtype}: use float32 or bfloat16')
  if device.startswith('cuda'):
    torch.set_float32_matmul_precision('high')
  torch.manual_seed(0)
  torch_dtype = getattr(torch, dtype)
  model = LM(hidden).to(device=device, dtype=torch_dtype)
  opt = torch.optim.SGD(model.parameters(), lr=1.0)
  state = tuple(torch.zeros(2, batch, hidden, device=device, dtype=torch_dtype) for _ in range(2))
  x = torch.randint(0, VOCAB, (bptt, batch), device=device)
  t = torch.randint(0, VOCAB, (bptt, batch), device=device)

  def step(state):
    state = tuple(s.detach() for s in state)
    logits, state = model(x, state)
    loss = nn.functional.cross_entropy(logits.view(-1, VOCAB).float(), t.view(-1))
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    return state

  def synchronize():
    if device.startswith('cuda'):
      torch.cuda.synchronize()

  for _ in range(3):
    state = step(state)
  synchronize()
  start = time.perf_counter()
  for _ in range(steps):
    state = step(state)
  synchronize()
  seconds = time.perf_counter() - start
  assert logits_dtype(model, x, state) == torch_dtype, 'the peer computed in another dtype'
  print(f'torch {device} {dtype} h={hidden} bptt={bptt} batch={batch}:'
        f' {steps * bptt * batch / seconds:.0f} tokens/s, {seconds / steps * 1e3:.1f} ms/step')


if __name__ == '__main__':
  main(sys.argv)
