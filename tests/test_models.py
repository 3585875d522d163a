"""The models: the paper's parameter counts, output shapes, lookup errors."""

import pytest
import torch

from fedlib.models import LANGUAGE_MODELS, MODELS, build_model, count_parameters, has_dropout, model_bytes


@pytest.mark.parametrize("name, params", [
    ("2nn", 199_210),        # the paper: 784-200-200-10
    ("cnn", 1_663_370),      # the paper's CNN (needs "same" padding)
    ("mlp", 159_010),
    ("cnn-small", 21_840),
    ("cifar-cnn", 62_006),
])                           # the LSTMs' counts, for Shakespeare's 98 symbols: tests/test_shakespeare.py
def test_parameter_counts(name, params):
    assert count_parameters(build_model(name)) == params


@pytest.mark.parametrize("name", sorted(set(MODELS) - set(LANGUAGE_MODELS)))
def test_forward_gives_logits_for_a_batch(name):
    shape = (3, 32, 32) if name == "cifar-cnn" else (1, 28, 28)
    model = build_model(name)
    assert model(torch.randn(4, *shape)).shape == (4, 10)


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_language_models_predict_every_position(name):
    model = build_model(name, num_classes=98, input_shape=(80,))
    assert model(torch.randint(0, 98, (4, 80))).shape == (4, 98, 80)      # (B, V, T): F.cross_entropy's layout


def test_paper_cnn_on_cifar_sized_input():
    model = build_model("cnn", input_shape=(3, 32, 32))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bytes_per_upload_is_float32_parameters():
    assert model_bytes(build_model("2nn")) == 4 * 199_210


def test_dropout_models_are_flagged():
    assert has_dropout(build_model("mlp")) and has_dropout(build_model("cnn-small"))
    assert not has_dropout(build_model("2nn")) and not has_dropout(build_model("cnn"))


def test_unknown_model_and_bad_input_shape():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("resnet")
    with pytest.raises(ValueError, match="input_shape for cnn-small"):
        build_model("cnn-small", input_shape=(3, 32, 32))
