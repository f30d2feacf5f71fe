"""Multi-layer RNNs taken apart, so that their layers can differ in precision.

``nn.LSTM(..., num_layers=3)`` is one module holding three layers; the dynamic int8 recipe may keep
one weight of one layer in float (Resemblyzer's speaker encoder needs its first layer's input
weights in float, see docs/tuning.md). Owns ``LayeredRNN`` (a stack of single-layer LSTMs/GRUs
giving the same outputs, bit for bit, as the multi-layer module it was split from) and
``WeightOnlyRNNLayer`` (one layer computed in float whose weights may be stored as int8 tensors and
dequantized on each call). Creating int8 tensors is ``quantizer.int8``'s job: this module only
stores and runs them. Must not import torch.ao, ray, click or ``jobs``.
"""

from __future__ import annotations

import torch
from torch import nn

RNN_TYPES = (nn.LSTM, nn.GRU)


def layer_weight_names(rnn: nn.Module, layer: int) -> list[str]:
    """``weight_ih_lK, weight_hh_lK, bias_ih_lK, bias_hh_lK`` (and ``_reverse``), torch's order."""
    suffixes = ["", "_reverse"] if rnn.bidirectional else [""]
    return [f"{kind}_{part}_l{layer}{suffix}" for suffix in suffixes
            for kind, part in (("weight", "ih"), ("weight", "hh"), ("bias", "ih"), ("bias", "hh"))]


def single_layer(rnn: nn.Module, layer: int) -> nn.Module:
    """Layer ``layer`` of a multi-layer ``nn.LSTM``/``nn.GRU`` as a one-layer module of its type."""
    directions = 2 if rnn.bidirectional else 1
    width = rnn.input_size if layer == 0 else rnn.hidden_size * directions
    one = type(rnn)(width, rnn.hidden_size, 1, bias=True, batch_first=rnn.batch_first,
                    bidirectional=rnn.bidirectional)
    with torch.no_grad():
        for name in layer_weight_names(rnn, layer):
            getattr(one, name.replace(f"_l{layer}", "_l0")).copy_(getattr(rnn, name))
    return one.train(rnn.training)


class LayeredRNN(nn.Module):
    """A multi-layer LSTM/GRU as a stack of one-layer modules, with the same call signature.

    Takes ``(input, hx=None)`` and returns ``(output, (h_n, c_n))`` for an LSTM or
    ``(output, h_n)`` for a GRU, ``h_n``/``c_n`` stacked layer by layer as torch does. For
    inference: dropout between layers is not applied.
    """

    def __init__(self, layers: list[nn.Module], mode: str, bidirectional: bool):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.mode, self.bidirectional = mode, bidirectional

    def forward(self, input, hx=None):  # noqa: A002  (torch's own argument name)
        width = 2 if self.bidirectional else 1
        states = []
        for index, layer in enumerate(self.layers):
            part = slice(index * width, (index + 1) * width)
            if hx is None:
                state = None
            elif self.mode == "LSTM":
                state = (hx[0][part], hx[1][part])
            else:
                state = hx[part]
            input, state = layer(input, state)
            states.append(state)
        if self.mode == "LSTM":
            return input, (torch.cat([s[0] for s in states]), torch.cat([s[1] for s in states]))
        return input, torch.cat(states)


def split_rnn(rnn: nn.Module) -> LayeredRNN:
    """``rnn`` (``nn.LSTM`` or ``nn.GRU``, biases on, no projection) as a ``LayeredRNN``."""
    layers = [single_layer(rnn, layer) for layer in range(rnn.num_layers)]
    return LayeredRNN(layers, rnn.mode, rnn.bidirectional)


class WeightOnlyRNNLayer(nn.Module):
    """One LSTM/GRU layer computed in float; a weight may be held as an int8 tensor.

    ``weights`` maps torch's names for layer 0 (``weight_ih_l0``, ... ``_reverse``) to float
    tensors or quantized (``qint8``) ones; quantized ones are dequantized on each call, so the
    layer's activations are never quantized. With every weight float it computes exactly what the
    one-layer ``nn.LSTM``/``nn.GRU`` does. The tensors are buffers under those names; loading a
    state_dict replaces them (scales included) instead of copying values into them.
    """

    def __init__(self, mode: str, batch_first: bool, bidirectional: bool,
                 weights: dict[str, torch.Tensor]):
        super().__init__()
        self.mode, self.batch_first, self.bidirectional = mode, batch_first, bidirectional
        self.names = list(weights)
        for name, tensor in weights.items():
            self.register_buffer(name, tensor)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in self.names:
            if prefix + name in state_dict:
                setattr(self, name, state_dict[prefix + name])
            elif strict:
                missing_keys.append(prefix + name)

    def forward(self, input, hx=None):  # noqa: A002
        flat = [t.dequantize() if t.is_quantized else t for t in (getattr(self, n) for n in self.names)]
        batch = input.shape[0 if self.batch_first else 1]   # batched (3-D) input only
        hidden = flat[1].shape[1]
        if hx is None:
            zeros = torch.zeros(2 if self.bidirectional else 1, batch, hidden, dtype=input.dtype)
            hx = (zeros, zeros) if self.mode == "LSTM" else zeros
        args = (True, 1, 0.0, False, self.bidirectional, self.batch_first)
        if self.mode == "LSTM":
            output, h, c = torch.lstm(input, tuple(hx), flat, *args)
            return output, (h, c)
        return torch.gru(input, hx, flat, *args)
