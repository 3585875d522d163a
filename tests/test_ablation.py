"""The ablation's knobs (input scaling, initialisation) and its settings, grids and commands."""

import json
import math

import pytest
import torch

from fedlib import reproduce as R
from fedlib.cli import build_parser, main
from fedlib.config import FedAvgConfig
from fedlib.data import SCALINGS, Dataset, load_dataset
from fedlib.models import INITS, build_model, initialize
from fedlib.params import InputError
from fedlib.runner import run
from fedlib.server import initial_model
from tests.helpers import write_fake_mnist


# --- input scaling ---------------------------------------------------------------------------

def test_each_scaling_gives_the_pixels_it_names(tmp_path):
    arrays = write_fake_mnist(tmp_path, n_train=50, n_test=20)
    pixels = torch.tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32).unsqueeze(1)
    data = {s: load_dataset("mnist", root=tmp_path, device="cpu", download=False, scaling=s) for s in SCALINGS}
    assert torch.equal(data["raw"].x_train, pixels)                        # 0-255, unchanged
    assert torch.equal(data["unit"].x_train, pixels / 255)                 # [0, 1]
    assert data["unit"].x_train.min() >= 0 and data["unit"].x_train.max() <= 1
    assert torch.equal(data["standardize"].x_train, (pixels / 255 - 0.1307) / 0.3081)
    assert {s: d.scaling for s, d in data.items()} == {s: s for s in SCALINGS}
    assert all(torch.equal(d.y_train, data["raw"].y_train) for d in data.values())
    assert data["unit"].to("cpu", torch.float64).scaling == "unit"      # moving keeps the scaling


def test_default_scaling_is_unchanged_and_a_bad_one_is_refused(tmp_path):
    write_fake_mnist(tmp_path)
    default = load_dataset("mnist", root=tmp_path, device="cpu", download=False)
    assert default.scaling == "standardize" == FedAvgConfig().input_scaling
    with pytest.raises(InputError, match="scaling must be one of"):
        load_dataset("mnist", root=tmp_path, device="cpu", download=False, scaling="minmax")


def test_real_mnist_unit_pixels_span_zero_to_one(mnist):
    unit = load_dataset("mnist", device="cpu", scaling="unit")
    assert unit.x_train.min() == 0 and unit.x_train.max() == 1
    # standardised = (unit - mean) / std, image by image
    assert torch.allclose((unit.x_train[:100] - 0.1307) / 0.3081, mnist.x_train[:100], atol=1e-5)


# --- initialisation ----------------------------------------------------------------------------

def test_pytorch_init_leaves_the_model_as_built():
    torch.manual_seed(0)
    a = build_model("2nn")
    torch.manual_seed(0)
    b = initialize(build_model("2nn"), "pytorch")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_truncated_normal_draws_within_two_std_of_0_1_and_biases_0_1():
    torch.manual_seed(0)
    model = initialize(build_model("2nn"), "truncated-normal")
    w = model.fc1.weight.detach()
    assert w.abs().max() <= 0.2                          # redrawn beyond 2 standard deviations
    # N(0, 0.1^2) cut at +-2 std has std 0.1 * 0.8796; 156,800 draws give it to well under 1%
    assert abs(w.std().item() - 0.08796) < 0.001 and abs(w.mean().item()) < 0.001
    for layer in (model.fc1, model.fc2, model.fc3):
        assert torch.all(layer.bias == 0.1) and layer.weight.abs().max() <= 0.2


def test_glorot_uniform_draws_within_its_bound_with_zero_biases():
    torch.manual_seed(0)
    model = initialize(build_model("2nn"), "glorot-uniform")
    for layer in (model.fc1, model.fc2, model.fc3):
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = layer.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound    # fills U(-a, a)
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.02 * bound  # U(-a, a) has std a / sqrt(3)
        assert torch.all(layer.bias == 0)
    conv = initialize(build_model("cnn"), "glorot-uniform").conv1        # fans count the kernel: 25 and 800
    assert conv.weight.abs().max() <= math.sqrt(6 / (25 + 800))


def test_initial_model_follows_config_init_and_is_seeded():
    for init in INITS:
        a, b = (initial_model(FedAvgConfig(init=init, seed=3)) for _ in range(2))
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    default, tn = initial_model(FedAvgConfig()), initial_model(FedAvgConfig(init="truncated-normal"))
    assert torch.all(tn.fc1.bias == 0.1) and not torch.all(default.fc1.bias == 0.1)
    with pytest.raises(InputError, match="init must be one of"):
        FedAvgConfig(init="he").validate()
    with pytest.raises(InputError, match="input_scaling must be one of"):
        FedAvgConfig(input_scaling="minmax").validate()


def test_the_new_flags_reach_the_config():
    args = build_parser().parse_args(["train", "--input-scaling", "unit", "--init", "glorot-uniform"])
    assert (args.input_scaling, args.init) == ("unit", "glorot-uniform")
    defaults = build_parser().parse_args(["train"])
    assert (defaults.input_scaling, defaults.init) == ("standardize", "pytorch")


# --- the ablation's settings, grids and commands ---------------------------------------------------

def test_ablation_settings_are_one_per_variant_and_cell_of_its_grid():
    settings = R.ablation_settings()
    assert len(settings) == len(R.ABLATION_GRID) and len({s.name for s in settings}) == len(settings)
    paper = {"2nn-iid-C0.1-E1-B10": 87, "2nn-shards-C0.1-E1-B10": 664, "2nn-iid-C0.1-E1-Binf": 1474}
    for s in settings:
        assert s.name == f"{s.cell}-{s.variant}" and (s.variant, s.cell) in R.ABLATION_GRID and s.table == "ablation"
        assert (s.model, s.frac, s.local_epochs, s.target) == ("2nn", 0.1, 1, 0.97)
        assert s.paper_rounds == paper[s.cell] and s.round_cap == 2 * s.paper_rounds
        variant = next(v for v in R.VARIANTS if v.name == s.variant)
        assert (s.input_scaling, s.init) == (variant.input_scaling, variant.init)
        assert s.seeds() == R.ABLATION_SEEDS and len(s.seeds()) >= 2
    for v in R.VARIANTS:                                    # every variant runs both B = 10 cells,
        cells = {s.cell for s in settings if s.variant == v.name}
        assert cells >= ({R.IID} if v.name in R.IID_ONLY else set(R.ABLATION_CELLS))   # or IID only
    fedlib = next(v for v in R.VARIANTS if v.name == "fedlib")            # the baseline is today's behaviour
    assert (fedlib.input_scaling, fedlib.init) == (FedAvgConfig().input_scaling, FedAvgConfig().init)


def test_ablation_grids_are_points_of_the_papers_multiplicative_grid():
    for (variant, partition), grid in R.ABLATION_GRID.items():
        assert list(grid) == sorted(set(grid)) and len(grid) >= 3, (variant, partition)
        for lr in grid:
            k = 6 * math.log10(lr)                      # 10^(k/6), k an integer, to 3 significant digits
            assert abs(k - round(k)) < 0.01, (variant, lr)
    assert R.lattice(-6, -4, -2) == (0.1, 0.215, 0.464)
    assert R.lattice(-7, -5) == (0.0681, 0.147)


def test_table_settings_are_unchanged_by_the_ablation():
    s = next(s for s in R.paper_settings("1") if s.name == "2nn-iid-C0.1-E1-B10")
    assert (s.variant, s.input_scaling, s.init) == ("", "standardize", "pytorch")
    assert s.learning_rates() == (0.05, 0.1, 0.2) and s.seeds() == (0, 1, 2)
    assert next(s for s in R.paper_settings("1") if s.name == "2nn-iid-C0.2-E1-B10").seeds() == (0,)


@pytest.mark.parametrize("cap", [None, 40])
def test_every_ablation_command_round_trips_to_its_run(cap):
    """The command stored in a result file selects exactly that setting, rate, seed and cap."""
    for s in R.ablation_settings():
        for lr in s.learning_rates():
            command = R.command_for(s, lr, 1, cap)
            argv = command.split()
            assert argv[:3] == ["python", "-m", "fedlib"]
            args = build_parser().parse_args(argv[3:])
            assert args.table == "ablation" and args.lr == [lr] and args.seeds == [1]
            assert args.max_rounds == cap
            (selected,) = R.select(R.settings_of(args.table), names=args.only)
            assert selected == s and R.run_id(selected, args.lr[0], args.seeds[0]) == R.run_id(s, lr, 1)


@pytest.fixture
def tiny_unit_mnist():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (1000,), generator=g)
    x = (torch.rand(1000, 1, 28, 28, generator=g) * 0.5 + y.view(-1, 1, 1, 1) / 20).clamp(0, 1)
    return Dataset("mnist", x, y, x[:200], y[:200], [str(i) for i in range(10)], scaling="unit")


def test_an_ablation_run_saves_its_variant_and_command(tiny_unit_mnist, tmp_path):
    setting = next(s for s in R.ablation_settings() if s.name == "2nn-iid-C0.1-E1-B10-unit-glorot")
    (result,) = R.sweep(R.jobs_of([setting], [0.1], [0]), tmp_path, max_rounds=2, data=tiny_unit_mnist,
                        progress=False)
    saved = json.loads((tmp_path / "2nn-iid-C0.1-E1-B10-unit-glorot-lr0.1-seed0.json").read_text())
    assert saved["command"] == ("python -m fedlib reproduce --table ablation --only 2nn-iid-C0.1-E1-B10-unit-glorot "
                                "--lr 0.1 --seeds 0 --max-rounds 2")
    config = saved["history"]["config"]
    assert (config["input_scaling"], config["init"], config["lr"]) == ("unit", "glorot-uniform", 0.1)
    assert saved["setting"]["variant"] == "unit-glorot" and result["rounds_run"] == 2
    # The same setting and seed trains the same way again: the file reproduces.
    (again,) = R.sweep([(setting, 0.1, 0)], tmp_path / "again", max_rounds=2, data=tiny_unit_mnist, progress=False)
    assert again["history"]["records"][-1]["test_accuracy"] == saved["history"]["records"][-1]["test_accuracy"]


def test_a_run_refuses_data_scaled_otherwise(tiny_unit_mnist, tmp_path):
    setting = next(s for s in R.ablation_settings() if s.name == "2nn-iid-C0.1-E1-B10-fedlib")
    with pytest.raises(InputError, match="the data is scaled 'unit' but input_scaling is 'standardize'"):
        R.sweep([(setting, 0.1, 0)], tmp_path, max_rounds=2, data=tiny_unit_mnist, progress=False)


def test_training_with_unit_inputs_matches_a_run_on_rescaled_data(tiny_unit_mnist):
    """The knob changes nothing but the inputs: a run on unit data equals a run on the same numbers."""
    config = FedAvgConfig(num_clients=10, frac=0.2, rounds=2, input_scaling="unit", init="truncated-normal",
                          device="cpu")
    copy = Dataset("mnist", tiny_unit_mnist.x_train.clone(), tiny_unit_mnist.y_train, tiny_unit_mnist.x_test.clone(),
                   tiny_unit_mnist.y_test, tiny_unit_mnist.classes, scaling="unit")
    a, b = run(config, tiny_unit_mnist, progress=False), run(config, copy, progress=False)
    assert a.accuracies == b.accuracies


def test_list_without_a_table_shows_every_table_and_the_ablation(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("# table")] == [
        "# table 1 (results/reproduce)", "# table 2 (results/reproduce)", "# table 2 (results/shakespeare)",
        "# table 2-reduced (results/shakespeare-reduced)", "# table ablation (results/ablation)",
        "# table beyond (results/beyond)"]
    ablation = lines[lines.index("# table ablation (results/ablation)") + 1:lines.index("# table beyond (results/beyond)")]
    planned = sum(len(s.learning_rates()) * len(s.seeds()) for s in R.ablation_settings())
    assert sum(line.startswith("pending 2nn-") for line in ablation) == planned
    assert ablation[-1] == f"# 0 done, {planned} pending, 0 corrupt, 0 extra"
    names = [line.split()[1] for line in lines if line.startswith("pending")]
    assert len(names) == len(set(names))                       # a cell of both tables is listed once
    assert main(["reproduce", "--only", "x"]) == 2
    assert "--table is required" in capsys.readouterr().err


def test_the_ablation_compares_with_the_paper_like_a_table(tiny_unit_mnist, tmp_path, capsys):
    setting = next(s for s in R.ablation_settings() if s.name == "2nn-iid-C0.1-E1-B10-unit")
    R.sweep(R.jobs_of([setting], [0.1], [0]), tmp_path, max_rounds=2, data=tiny_unit_mnist, progress=False)
    rows = {r["setting"]: r for r in R.comparison_rows("ablation", tmp_path)}
    assert set(rows) == {s.name for s in R.ablation_settings()}
    assert rows[setting.name]["variant"] == "unit" and rows[setting.name]["paper"] == 87
    assert rows[setting.name]["ours"] == "not reached in 2"
    assert rows[setting.name]["etas"] == f"1/{len(setting.learning_rates())}"
    assert rows["2nn-shards-C0.1-E1-B10-glorot"]["ours"] == "not yet run"
    assert main(["reproduce", "--table", "ablation", "--summary", "--out", str(tmp_path)]) == 0
    assert "2nn-iid-C0.1-E1-B10-unit                 paper    87  ours not reached in 2" in capsys.readouterr().out
