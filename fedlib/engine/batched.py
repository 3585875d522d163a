"""The batched model: M copies of one of fedlib's networks, each with its own weights, as one network.

fedlib's models are small, and a training step of one client (B = 10 images) is far too
little work to keep a CPU's vector units or a GPU busy. Here the M models of a round
(its clients, or the clients of several runs at once) become one network whose every
layer is a single large operation:

=============  ====================================================================
layer          batched form (weights stacked along a leading model axis M)
=============  ====================================================================
Conv2d         one grouped convolution: the M models' channels side by side,
               ``groups = M``; activations (W, M * C, H, W), W = examples per model
Linear         one batched matrix product ``baddbmm``; activations (M, W, features)
ReLU, pooling  elementwise or per channel, so unchanged on the stacked activations
Dropout        a multiplication by a mask drawn beforehand (``fedlib.engine.schedule``),
Dropout2d      one per model and example, exactly the mask ``nn.Dropout`` would draw
Embedding      one lookup in the M models' tables stacked into one (model m's ids
               offset by m * V); activations (M, W, T, dim)
LSTM           per layer and position, one ``baddbmm`` of the M models' input and
               previous state with their weights, then the gates, elementwise; the
               backward pass written out (:class:`BatchedLSTMLayer`)
=============  ====================================================================

The LSTM's layers follow the equations ``nn.LSTM`` documents, with its gate order (input,
forget, cell, output) and its two biases; the linear layer after them sees the W * T
positions of each model as its rows, so the logits are (M, W, T, classes). On a CPU this
batched LSTM is slower than ``nn.LSTM`` run one client at a time (oneDNN's fused kernel),
so ``engine="auto"`` trains LSTMs sequentially there (``benchmarks/README.md``).

Each model's outputs depend only on its own weights and examples, so the sum of the M
models' losses has, for each model's weights, that model's own gradient: one backward
pass of the batched network gives all M gradients.

A network is batched from its *program*, the sequence of layers its ``forward`` runs
(:data:`PROGRAMS`, written out for each of fedlib's models). Only a model whose class is
exactly one of these, with the layer settings the program supports, is batched; for any
other model :func:`program_for` returns None and the engine falls back to ``vmap``.
``tests/test_engine_batched.py`` checks every program against its model's ``forward``.

Two departures from the literal program, both exact: a ReLU followed by max pooling runs
after it (:func:`pool_before_relu`: the two commute), and with plain SGD each linear layer
applies its own update inside the backward pass (:class:`BatchedLinear`), so that its
weights are read and written once instead of through a gradient tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedlib.models import CNN, CharLSTM, CifarCNN, MLPDropout, SmallCNN, TwoNN

# The layers each model's forward runs, in order (compare with fedlib/models.py).
# ("conv", name), ("linear", name), ("dropout", name), ("embedding", name), ("lstm", name):
# the model's submodule of that name; "relu"; ("pool", k): k x k max pooling; "flatten":
# (C, H, W) -> C * H * W, in that order. A program that starts with an embedding reads
# sequences of ids (M, W, T); its linear layers act on every position.
PROGRAMS: dict[type, tuple] = {
    TwoNN: ("flatten", ("linear", "fc1"), "relu", ("linear", "fc2"), "relu", ("linear", "fc3")),
    CNN: (("conv", "conv1"), "relu", ("pool", 2), ("conv", "conv2"), "relu", ("pool", 2), "flatten",
          ("linear", "fc1"), "relu", ("linear", "fc2")),
    MLPDropout: ("flatten", ("linear", "fc1"), ("dropout", "dropout"), "relu", ("linear", "fc2")),
    SmallCNN: (("conv", "conv1"), ("pool", 2), "relu", ("conv", "conv2"), ("dropout", "conv2_drop"), ("pool", 2),
               "relu", "flatten", ("linear", "fc1"), "relu", ("dropout", "fc1_drop"), ("linear", "fc2")),
    CifarCNN: (("conv", "conv1"), "relu", ("pool", 2), ("conv", "conv2"), "relu", ("pool", 2), "flatten",
               ("linear", "fc1"), "relu", ("linear", "fc2"), "relu", ("linear", "fc3")),
    CharLSTM: (("embedding", "embed"), ("lstm", "lstm"), ("linear", "fc")),
}


@dataclass(frozen=True)
class DropoutLayer:
    """A dropout layer of a program: its name, drop probability p, and the shape of the
    mask ``nn.Dropout`` draws for one example (``(C, 1, 1)`` for Dropout2d, ``(features,)``)."""

    name: str
    p: float
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class BatchedModel:
    """The batched form of one of fedlib's models (see the module docstring).

    ``forward(params, x, masks)``: params, name -> (M, *shape) stacked weights; x, the
    inputs as :meth:`gather` lays them out; masks, one tensor per dropout layer, laid
    out by :meth:`layout_masks`. Returns the logits (M, W, classes). channels_last: lay
    the convolutions' activations out channels-last (faster for grouped convolutions on
    a CPU: 2x for the small CNN's step).
    """

    def __init__(self, model: nn.Module, program: tuple, channels_last: bool):
        self.program = pool_before_relu(program)
        program = self.program
        self.channels_last = channels_last
        self.sequential = isinstance(program[0], tuple) and program[0][0] == "embedding"   # reads ids (T,)
        self.convolutional = program[0] != "flatten" and not self.sequential
        self.modules = dict(model.named_modules())
        self.lstm_layers = {op[1]: self.modules[op[1]].num_layers for op in self._layers("lstm")}
        self.padding = {name: self.modules[name].padding for kind, name in self._layers("conv")}
        self.dropouts: list[DropoutLayer] = []
        self._buffers: dict[str, torch.Tensor] = {}
        width = None                  # channels, or features after "flatten": what a dropout mask covers
        for i, op in enumerate(program):
            if op == "flatten":
                width = next(self.modules[o[1]].in_features for o in program[i:] if o[0] == "linear")
            elif op[0] == "conv":
                width = self.modules[op[1]].out_channels
            elif op[0] == "linear":
                width = self.modules[op[1]].out_features
            elif op[0] == "dropout":
                layer = self.modules[op[1]]
                shape = (width, 1, 1) if isinstance(layer, nn.Dropout2d) else (width,)
                self.dropouts.append(DropoutLayer(op[1], float(layer.p), shape))

    def _gradient_buffer(self, name: str, w: torch.Tensor) -> torch.Tensor | None:
        """A linear layer's reusable weight-gradient tensor, on a CPU for large layers (>= 1 MB)."""
        if w.device.type != "cpu" or w.numel() * w.element_size() < 2**20:
            return None
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != w.shape or buffer.dtype != w.dtype:
            buffer = self._buffers[name] = torch.empty_like(w, memory_format=torch.contiguous_format)
        return buffer

    def _layers(self, kind: str):
        return [op for op in self.program if isinstance(op, tuple) and op[0] == kind]

    def gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The inputs of one step: x (N, C, H, W) the training set, index (M, W) each
        model's examples. Convolutional: (W, M * C, H, W), the M models side by side
        along the channels; sequences (x (N, T) ids): (M, W, T); otherwise (M, W, C * H * W)."""
        if self.sequential:
            return x[index]
        if not self.convolutional:
            return x[index].flatten(2)
        m, w = index.shape
        batch = x[index.t()].reshape(w, m * x.shape[1], x.shape[2], x.shape[3])
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def layout_masks(self, masks: list[torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """A round's dropout masks (per layer (S, M, W, *shape), ``schedule.dropout_masks``)
        laid out for the batched layers, with a leading step axis, on ``device``."""
        out = {}
        for layer, mask in zip(self.dropouts, masks):
            if len(layer.shape) == 3:                             # (S, M, W, C, 1, 1) -> (S, W, M * C, 1, 1)
                num_steps, m, w = mask.shape[:3]
                mask = mask.transpose(1, 2).reshape(num_steps, w, m * layer.shape[0], 1, 1)
            out[layer.name] = mask.to(device)
        return out

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor,
                masks: dict[str, torch.Tensor] | None = None,
                sgd_step: float | torch.Tensor | None = None) -> torch.Tensor:
        """The logits (M, W, classes), or (M, W, T, classes) for sequences. sgd_step: for
        plain SGD, the step's rate (eta, or (M,) one per model): the backward pass then
        updates each linear layer's weights itself (see :class:`BatchedLinear`) and gives
        them no gradient."""
        h, m = x, next(iter(params.values())).shape[0]
        for op in self.program:
            if op == "relu":
                h = F.relu(h)
            elif op == "flatten":
                if self.convolutional:                            # (W, M * C, H, W) -> (M, W, C * H * W)
                    h = h.reshape(h.shape[0], m, -1).transpose(0, 1)
            elif op[0] == "pool":
                h = F.max_pool2d(h, op[1])
            elif op[0] == "dropout":
                h = h * masks[op[1]]
            elif op[0] == "conv":
                w, b = params[f"{op[1]}.weight"], params[f"{op[1]}.bias"]
                h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), padding=self.padding[op[1]], groups=m)
            elif op[0] == "linear":
                w, b = params[f"{op[1]}.weight"], params[f"{op[1]}.bias"]
                rows = h.shape[1:-1]                              # (W,), or (W, T) for sequences
                h = BatchedLinear.apply(h.reshape(m, -1, h.shape[-1]), w, b, self._gradient_buffer(op[1], w),
                                        sgd_step).view(m, *rows, -1)
            elif op[0] == "embedding":
                table = params[f"{op[1]}.weight"]                 # (M, V, dim)
                offset = torch.arange(m, device=h.device).view(m, 1, 1) * table.shape[1]
                h = F.embedding(h + offset, table.reshape(-1, table.shape[2]))      # (M, W, T, dim)
            elif op[0] == "lstm":
                h = batched_lstm(params, op[1], h, self.lstm_layers[op[1]])
        return h


class BatchedLinear(torch.autograd.Function):
    """M linear layers at once: h (M, W, in), w (M, out, in), b (M, out) -> h w^T + b.

    Written out so that the weight gradient g^T h comes out of one ``bmm`` in the
    weight's own layout (autograd's backward of ``baddbmm(b, h, w.transpose(1, 2))``
    returns it transposed, and updating a contiguous weight from a transposed gradient
    streams memory in the wrong order: 3x slower for the paper CNN's fc1 on a CPU).
    ``buffer``, if given, receives the weight gradient: on a CPU a fresh 64 MB gradient
    (the paper CNN's fc1, 10 clients) costs more in page faults than the product itself.

    ``sgd_step`` (plain SGD only): eta, or (M,) one rate per model. The backward pass
    then applies the update itself, as the 2NN's hand-written step does: the gradient
    for the layer below is taken with the weights from before the update (as autograd
    would), then ``w <- w - eta g^T h`` in one ``baddbmm_`` and ``b <- b - eta sum(g)``;
    the weights get no gradient. No gradient is written and read back, and no separate
    pass over the weights is made: on a CPU the paper CNN's fc1 (64 MB for 10 clients)
    is streamed twice per step instead of five times.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, buffer: torch.Tensor | None,
                sgd_step: float | torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(h, w, b)
        ctx.buffer, ctx.sgd_step = buffer, sgd_step
        return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, w, b = ctx.saved_tensors
        grad_h = torch.bmm(g, w) if ctx.needs_input_grad[0] else None      # before w changes
        rate = ctx.sgd_step
        if rate is None:
            grad_w = torch.bmm(g.transpose(1, 2), h, out=ctx.buffer) if ctx.buffer is not None else \
                torch.bmm(g.transpose(1, 2), h)
            return grad_h, grad_w, g.sum(1), None, None
        if isinstance(rate, torch.Tensor):                                  # one rate per model
            g = g * rate.view(-1, 1, 1)
            rate = 1.0
        w.baddbmm_(g.transpose(1, 2), h, alpha=-rate)
        b.sub_(g.sum(1), alpha=rate)
        return grad_h, None, None, None, None


def batched_lstm(params: dict[str, torch.Tensor], name: str, h: torch.Tensor, num_layers: int) -> torch.Tensor:
    """M stacked ``nn.LSTM`` s (batch first, state starting at zero) on h (M, W, T, in) -> (M, W, T, hidden),
    layer after layer (:class:`BatchedLSTMLayer`), computed position-major (T, M, W, .)."""
    h = h.permute(2, 0, 1, 3)                                     # (T, M, W, in)
    for layer in range(num_layers):
        h = BatchedLSTMLayer.apply(h, params[f"{name}.weight_ih_l{layer}"], params[f"{name}.weight_hh_l{layer}"],
                                   params[f"{name}.bias_ih_l{layer}"], params[f"{name}.bias_hh_l{layer}"])
    return h.permute(1, 2, 0, 3)


class BatchedLSTMLayer(torch.autograd.Function):
    """One LSTM layer of M models: x (T, M, W, in) -> h (T, M, W, hidden), with its backward
    written out (backpropagation through time).

    Forward, as PyTorch documents ``nn.LSTM``, for each position t with h_0 = c_0 = 0:
    z_t = [x_t, h_{t-1}] [W_ih, W_hh]^T + b_ih + b_hh, cut into (i, f, g, o);
    i, f, o = sigmoid(.), g = tanh(.); c_t = f c_{t-1} + i g; h_t = o tanh(c_t).
    Each position is one ``baddbmm`` of the M models' [x_t, h_{t-1}] (kept side by side in
    one buffer: h_t is written where position t + 1 reads it) and seven elementwise
    operations. Weights: w_ih (M, 4 hidden, in), w_hh (M, 4 hidden, hidden), biases (M, 4 hidden).

    Backward from dL/dh_t, going back in t: dh = dL/dh_t + (what position t + 1 sent back
    to h_t), dc = dh o (1 - tanh(c_t)^2) + dc_{t+1} f_{t+1},
    dz_t = (dc g i (1 - i), dc c_{t-1} f (1 - f), dc i (1 - g^2), dh tanh(c_t) o (1 - o)),
    and dz_t [W_ih, W_hh] = (dL/dx_t, what goes back to h_{t-1}) in one ``bmm``. The factors
    that multiply dc and dh are computed for all positions before the loop, which is left
    with six operations per position; the weight gradients are one batched product over
    all positions, d[W_ih, W_hh] = sum_t dz_t^T [x_t, h_{t-1}], db = sum_t dz_t.
    For B = 10 sequences the number of operations per position, more than their arithmetic,
    bounds a step: autograd through the same equations would record each forward operation
    and run more than one backward operation for most of them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                b_hh: torch.Tensor) -> torch.Tensor:
        t, m, w, n_in = x.shape
        hidden = w_hh.shape[2]
        weight = torch.cat([w_ih, w_hh], dim=2).transpose(1, 2)   # (M, in + hidden, 4 hidden)
        bias = (b_ih + b_hh).unsqueeze(1)
        xh = x.new_zeros(t + 1, m, w, n_in + hidden)              # [x_t, h_{t-1}]; h_t lands in row t + 1
        xh[:t, ..., :n_in] = x
        gates = x.new_empty(t, m, w, 4 * hidden)                  # the gates' values i, f, g, o
        cells, tanh_cells = x.new_empty(t, m, w, hidden), x.new_empty(t, m, w, hidden)
        for s in range(t):
            z = torch.baddbmm(bias, xh[s], weight, out=gates[s])
            z[..., :2 * hidden].sigmoid_()                        # i, f
            z[..., 2 * hidden:3 * hidden].tanh_()                 # g
            z[..., 3 * hidden:].sigmoid_()                        # o
            i, f, g, o = z.split(hidden, dim=-1)
            torch.mul(i, g, out=cells[s])
            if s:
                cells[s].addcmul_(f, cells[s - 1])
            torch.tanh(cells[s], out=tanh_cells[s])
            torch.mul(o, tanh_cells[s], out=xh[s + 1, ..., n_in:])
        ctx.save_for_backward(xh, weight, gates, cells, tanh_cells)
        ctx.n_in = n_in
        return xh[1:, ..., n_in:]

    @staticmethod
    def backward(ctx, d_hs: torch.Tensor):
        xh, weight, gates, cells, tanh_cells = ctx.saved_tensors
        t, m, w, hidden = cells.shape
        n_in = ctx.n_in
        i, f, g, o = gates.split(hidden, dim=-1)
        c_prev = torch.cat([torch.zeros_like(cells[:1]), cells[:-1]])
        from_h = o * (1 - tanh_cells * tanh_cells)                # dc = dh * from_h (+ the next position's)
        from_c = torch.cat([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], dim=-1)   # dz_ifg = dc * .
        to_o = tanh_cells * o * (1 - o)                           # dz_o = dh * to_o
        dz = torch.empty_like(gates)
        d_xh = xh.new_empty(t, m, w, n_in + hidden)               # row s: dL/d[x_s, h_{s-1}] from position s
        backward_weight = weight.transpose(1, 2)                  # (M, 4 hidden, in + hidden)
        dc_next = None
        for s in reversed(range(t)):
            dh = d_hs[s] if s == t - 1 else d_hs[s] + d_xh[s + 1, ..., n_in:]
            dc = dh * from_h[s] if dc_next is None else torch.addcmul(dc_next, dh, from_h[s])
            torch.mul(dc.unsqueeze(2), from_c[s].view(m, w, 3, hidden), out=dz[s, ..., :3 * hidden].view(m, w, 3, hidden))
            torch.mul(dh, to_o[s], out=dz[s, ..., 3 * hidden:])
            torch.bmm(dz[s], backward_weight, out=d_xh[s])
            if s:
                dc_next = dc * f[s]
        rows = dz.permute(1, 0, 2, 3).reshape(m, t * w, 4 * hidden)
        inputs = xh[:t].permute(1, 0, 2, 3).reshape(m, t * w, n_in + hidden)
        d_weight = torch.bmm(rows.transpose(1, 2), inputs)        # (M, 4 hidden, in + hidden)
        d_b = rows.sum(1)
        d_x = d_xh[..., :n_in] if ctx.needs_input_grad[0] else None
        return d_x, d_weight[..., :n_in], d_weight[..., n_in:], d_b, d_b


def pool_before_relu(program: tuple) -> tuple:
    """``program`` with every ReLU that is followed by max pooling moved after it.

    The two commute exactly: max(relu(a)) = relu(max(a)), and the gradient reaches the
    same input (the window's first largest value; where that is <= 0, ReLU's gradient is
    0 either way). Pooling first applies the ReLU, forward and backward, to a quarter of
    the values (2 x 2 pooling): the paper CNN's ReLUs run on 14 x 14 and 7 x 7 maps
    instead of 28 x 28 and 14 x 14.
    """
    ops = list(program)
    for i in range(len(ops) - 1):
        if ops[i] == "relu" and isinstance(ops[i + 1], tuple) and ops[i + 1][0] == "pool":
            ops[i], ops[i + 1] = ops[i + 1], ops[i]
    return tuple(ops)


def program_for(model: nn.Module) -> tuple | None:
    """The program of ``model`` if it is exactly one of fedlib's models with the layer
    settings a program supports (stride 1, no dilation, biases, no buffers; an LSTM
    batch-first, one-directional, without projection or dropout), else None."""
    program = PROGRAMS.get(type(model))
    if program is None or any(True for _ in model.buffers()):
        return None
    modules = dict(model.named_modules())
    for op in program:
        if not isinstance(op, tuple) or op[0] == "pool":
            continue
        layer = modules.get(op[1])
        if op[0] == "conv":
            if not (isinstance(layer, nn.Conv2d) and layer.bias is not None and layer.stride == (1, 1)
                    and layer.dilation == (1, 1) and layer.groups == 1 and layer.padding_mode == "zeros"
                    and isinstance(layer.padding, tuple)):
                return None
        elif op[0] == "linear":
            if not (isinstance(layer, nn.Linear) and layer.bias is not None):
                return None
        elif op[0] == "dropout":
            if not (type(layer) in (nn.Dropout, nn.Dropout2d) and not layer.inplace):
                return None
        elif op[0] == "embedding":
            if not (type(layer) is nn.Embedding and layer.padding_idx is None and layer.max_norm is None
                    and not layer.scale_grad_by_freq and not layer.sparse):
                return None
        elif op[0] == "lstm":
            if not (type(layer) is nn.LSTM and layer.batch_first and layer.bias and not layer.bidirectional
                    and layer.proj_size == 0 and layer.dropout == 0):
                return None
    named = {op[1] for op in program if isinstance(op, tuple) and op[0] != "pool"}
    if {name for name, _ in model.named_children()} != named:
        return None
    return program
