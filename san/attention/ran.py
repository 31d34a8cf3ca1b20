"""RAN: the recurrent attention competitor of the SAN paper's time-series experiments (Section IV-D, Tables VI–VII),
after Mnih, Heess, Graves and Kavukcuoglu, "Recurrent models of visual attention" (NIPS 2014, the paper's [23]).

The SAN paper says only that RAN "aims at learning the subset of input features at t while relying on the model
output at time t-1". Mnih et al. pick a hard glimpse location with a stochastic policy trained by REINFORCE, from
an RNN's state; none of that carries over to a module that sits between the layers of an LSTM and must pass
gradients. So the SAN paper leaves open, and this module chooses:

- where the state comes from: the site's own sequence. At a site after a recurrent layer, ``h_t`` is that
  layer's hidden state at t, so ``h_{t-1}`` *is* "the model output at time t-1"; ``h_{-1} = 0``;
- soft vs hard glimpses: soft — a differentiable mask over the features trained by backpropagation with the rest
  of the network, not a sampled location trained by REINFORCE;
- the mask's form and nonlinearity: an affine map of the current features and one of the previous state, then a
  sigmoid, as in SAN, CBAM and BAM — each feature is kept or suppressed independently (no softmax competition):

      a_t = sigmoid(W_x h_t + W_s h_{t-1} + b),    output_t = h_t * a_t

  with ``W_x`` and ``W_s`` C×C (``w_x`` carries ``b``). The mask at t depends on ``h_t`` and ``h_{t-1}`` only,
  so the module is causal.

Inputs are sequences shaped N×C×T (C = features); all steps are computed at once, no loop over time.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from san.attention.base import AttentionModule, Tap


class RAN(AttentionModule):
    """Recurrent attention over features: ``h * sigmoid(W_x h_t + W_s h_{t-1} + b)`` on an N×C×T sequence.

    Args:
        channels: C, the features of the sequence at this position.
    """

    takes_previous = False
    supported_dims = (1,)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.w_x = nn.Linear(channels, channels)
        self.w_s = nn.Linear(channels, channels, bias=False)
        self.mask = Tap()

    def forward(self, h: Tensor) -> Tensor:
        if h.dim() != 3:
            raise ValueError(f"RAN takes N×C×T sequences, got shape {tuple(h.shape)}")
        steps = h.transpose(1, 2)  # N×T×C: the linear maps act on each step's feature vector
        previous = F.pad(steps[:, :-1], (0, 0, 1, 0))  # h_{t-1}, with h_{-1} = 0
        logits = self.w_x(steps) + self.w_s(previous)
        mask = self.mask(torch.sigmoid(logits).transpose(1, 2))
        return h * mask

    def extra_repr(self) -> str:
        return f"{self.channels}"
