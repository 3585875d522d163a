"""The models of the paper and of the most-used PyTorch reproduction.

Every image model maps a batch of images (B, C, H, W) to logits (B, num_classes); the
character LSTMs map a batch of character ids (B, T) to logits (B, num_classes, T), one
prediction per position with the classes along dim 1, the layout ``F.cross_entropy`` and
``argmax(1)`` take for sequences. The loss is cross-entropy on the logits.

=============  =================================================  ===========
name           architecture                                       parameters
=============  =================================================  ===========
``2nn``        paper: 784-200-200-10 MLP, ReLU                    199,210
``cnn``        paper: conv5x5(32)-pool-conv5x5(64)-pool-fc512-fc  1,663,370
``mlp``        reproduction: 784-200-10, dropout 0.5              159,010
``cnn-small``  reproduction: conv(10)-conv(20)-fc50-fc10, dropout  21,840
``cifar-cnn``  conv(6)-conv(16)-fc120-fc84-fc10 for 3x32x32        62,006
``lstm``       paper: embed 8, 2 LSTM layers of 256, softmax      824,690
``lstm-small`` the same with 2 LSTM layers of 64 (quick profile)   59,378
=============  =================================================  ===========

The LSTMs' counts are for Shakespeare's 98 symbols (``fedlib.shakespeare.VOCAB``); with V
symbols the paper's LSTM has 8 V + 798,720 + 257 V = 265 V + 798,720 parameters. The paper
counts 866,578. Solving for V over the layouts we tried (one bias per gate as in TensorFlow's
cell, or two as in PyTorch's; with or without peephole connections; with or without the
softmax layer's bias; input and output vocabularies equal or within 6 of each other), the
only whole-number solution is one bias per gate, peepholes, a softmax bias and V = 258
(256 byte values and two special symbols, perhaps). With V = 258 this model has 867,090
parameters, 512 more: PyTorch's second bias (+2,048) without the peepholes (-1,536). That is
an inference from the count; the paper does not state its vocabulary.

Every model starts from PyTorch's default initialisation; :func:`initialize` redraws
the weights of its linear and convolutional layers the way TensorFlow programs of
2016 commonly did (``INITS``), for the ablation in lesson 6.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TwoNN(nn.Module):
    """The paper's "2NN": two hidden layers of 200 units with ReLU (199,210 parameters)."""

    def __init__(self, in_features: int = 784, hidden: int = 200, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, 1, 28, 28) -> (B, 10)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class CNN(nn.Module):
    """The paper's CNN: two 5x5 convolutions (32, 64 channels, "same" padding), each
    followed by 2x2 max pooling, a 512-unit ReLU layer and a softmax output
    (1,663,370 parameters)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(64 * (image_size // 4) ** 2, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, 1, 28, 28) -> (B, 10)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)        # (B, 32, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)        # (B, 64, 7, 7)
        x = F.relu(self.fc1(x.flatten(1)))                # (B, 512)
        return self.fc2(x)


class MLPDropout(nn.Module):
    """The reproduction's MLP: one hidden layer of 200, dropout 0.5 (159,010 parameters)."""

    def __init__(self, in_features: int = 784, hidden: int = 200, num_classes: int = 10, p: float = 0.5):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.dropout = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dropout(self.fc1(x.flatten(1))))
        return self.fc2(x)


class SmallCNN(nn.Module):
    """The reproduction's CNN for 1x28x28 input: conv5x5(10)-pool-conv5x5(20)-dropout-pool,
    fc 50 with dropout, fc 10 (21,840 parameters)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc1_drop = nn.Dropout()
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))                   # (B, 10, 12, 12)
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))  # (B, 20, 4, 4)
        x = self.fc1_drop(F.relu(self.fc1(x.flatten(1))))            # (B, 50)
        return self.fc2(x)


class CifarCNN(nn.Module):
    """A small CIFAR-10 CNN (the PyTorch tutorial's): conv5x5(6)-pool-conv5x5(16)-pool,
    fc 120, fc 84, fc 10 (62,006 parameters)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, 3, 32, 32) -> (B, 10)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)        # (B, 6, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)        # (B, 16, 5, 5)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class CharLSTM(nn.Module):
    """The paper's character LSTM (Section 3): each character embedded in 8 dimensions, two
    LSTM layers of 256 units, a softmax over the characters at every position.

    forward: (B, T) int64 character ids -> (B, num_classes, T) logits, the prediction of the
    character after each position. The state starts at zero for every sequence.
    """

    def __init__(self, num_classes: int = 98, embedding: int = 8, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(num_classes, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, T) -> (B, V, T)
        h, _ = self.lstm(self.embed(x))                     # (B, T, hidden)
        return self.fc(h).transpose(1, 2)


def small_char_lstm(num_classes: int = 98) -> CharLSTM:
    """The character LSTM with 2 layers of 64 units: the quick profile's model on a CPU."""
    return CharLSTM(num_classes, hidden=64)


# How w_0 is drawn for every linear and convolutional layer:
# pytorch: PyTorch's default, weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in));
# truncated-normal: weights ~ N(0, 0.1^2) redrawn beyond 2 standard deviations, biases 0.1
#   (TensorFlow's truncated_normal(stddev=0.1) and constant(0.1), as in its 2016 MNIST tutorial);
# glorot-uniform: weights ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)), biases 0
#   (Glorot and Bengio 2010; the default of TensorFlow's and Keras's dense layers).
INITS = ("pytorch", "truncated-normal", "glorot-uniform")


def initialize(model: nn.Module, init: str = "pytorch") -> nn.Module:
    """Redraw the weights of ``model``'s linear and convolutional layers as ``init`` says
    (one of ``INITS``; ``pytorch`` leaves the model as built). Draws from torch's global
    random state, so seed it first (``fedlib.server.initial_model`` does)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "pytorch":
        return model
    for layer in model.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            if init == "truncated-normal":
                nn.init.trunc_normal_(layer.weight, mean=0.0, std=0.1, a=-0.2, b=0.2)
                nn.init.constant_(layer.bias, 0.1)
            else:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
    return model


MODELS = {"2nn": TwoNN, "cnn": CNN, "mlp": MLPDropout, "cnn-small": SmallCNN, "cifar-cnn": CifarCNN,
          "lstm": CharLSTM, "lstm-small": small_char_lstm}
# The models that read sequences of character ids (T,) instead of images (C, H, W).
LANGUAGE_MODELS = ("lstm", "lstm-small")


def build_model(name: str, num_classes: int = 10, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Build a model by name (see the table in this module's docstring).

    input_shape: (C, H, W) of one image; None means each model's own
    (1, 28, 28) for the MNIST models, (3, 32, 32) for ``cifar-cnn``. For the LSTMs,
    num_classes is the vocabulary size and input_shape (T,), one sequence (any T).
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")
    if name in LANGUAGE_MODELS:
        if input_shape is not None and len(input_shape) != 1:
            raise ValueError(f"input_shape for {name} must be (T,), one sequence of character ids, "
                             f"got {tuple(input_shape)}")
        return MODELS[name](num_classes=num_classes)
    if input_shape is None:
        return MODELS[name](num_classes=num_classes)
    channels, height, width = input_shape
    if name in ("2nn", "mlp"):
        return MODELS[name](in_features=channels * height * width, num_classes=num_classes)
    if name == "cnn":
        return CNN(in_channels=channels, num_classes=num_classes, image_size=height)
    expected = (3, 32, 32) if name == "cifar-cnn" else (1, 28, 28)
    if tuple(input_shape) != expected:
        raise ValueError(f"input_shape for {name} must be {expected}, got {tuple(input_shape)}")
    return MODELS[name](num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    """The number of trainable numbers in ``model``."""
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: nn.Module) -> int:
    """Bytes one client uploads per round: every parameter as float32 (4 bytes)."""
    return 4 * count_parameters(model)


def has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` uses dropout, so its training step is random."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
