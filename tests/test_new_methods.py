"""SimNPO, RMU and SAM, each checked against numbers computed here, independently of the code under test.

- SimNPO's loss (``losses.simnpo_loss`` fed by ``losses.token_logprobs``) on a tiny hand-made example,
  against the published formula worked out with ``math`` on plain floats, for gamma zero and positive, in
  its closed form ``(2/beta) * log(1 + exp(gamma - beta * n))``, and with its gradient: SimNPO is
  minimised to make the forget data *less* likely, so raising the logit of the correct token must raise
  the loss.
- ``activation_mse`` (RMU's loss) by hand, with a masked-out position that would change the value.
- RMU end to end on the tiny trained model: every weight outside the MLPs of layers ``l-2 .. l`` stays
  bit-identical (the allowed set is derived here from parameter names), the allowed MLP weights move, and
  the hidden states after layer ``l`` on forget data, read with a hook written here, get closer to
  ``c * u`` with ``u`` redrawn here from the seed. Also its configuration errors.
- SAM's ascent-then-descent step on a two-parameter loss, against a plain-Python AdamW: where the loss is
  evaluated (at ``w`` and at ``w + rho * g / ||g||``), the weights after two steps, and the logged loss
  (at ``w``, not at the perturbed point). The same run without SAM must end elsewhere.
- SAM with SURE: the weights SURE did not select stay bit-identical (checked here tensor by tensor, not
  only by the record).
- SimNPO+GDR end to end lowers forget recall.

Each check compares with values computed here, so a wrong sign, shift, normalisation or layer window in
the code under test makes it fail.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from relapse.data import load_benchmark
from relapse.data.prompts import qa_text
from relapse.errors import ConfigError
from relapse.methods import losses
from relapse.methods.registry import parse_method
from relapse.methods.unlearn import UnlearnConfig, unlearn_model
from relapse.metrics.qa import qa_recall
from relapse.models import load_model
from relapse.runtime import RunContext
from relapse.training.loop import LoopConfig, run_loop

# ---------------------------------------------------------------------------------------------------
# SimNPO's loss by hand

#: Logits ``[1, 4, V=3]``. Position t predicts label t + 1: position 0 predicts 2, position 1 predicts 0,
#: position 2 predicts an ignored label, position 3 predicts nothing. So exactly two tokens count.
LOGITS = [[0.5, -1.0, 2.0], [1.5, 0.2, -0.3], [0.0, 0.7, -0.4], [3.0, 3.0, 3.0]]
LABELS = [1, 2, 0, -100]
#: The (position, next label) pairs that count.
COUNTED = [(0, 2), (1, 0)]


def _log_softmax_at(row: list[float], k: int) -> float:
    return row[k] - math.log(sum(math.exp(z) for z in row))


def _softmax_at(row: list[float], k: int) -> float:
    return math.exp(_log_softmax_at(row, k))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _simnpo_by_hand(logits: list[list[float]], counted: list[tuple[int, int]], beta: float, gamma: float):
    """The published per-sequence SimNPO term ``-(2/beta) * logsigmoid(-(beta/|y|) * log p(y) - gamma)``."""
    logp = sum(_log_softmax_at(logits[t], k) for t, k in counted)
    x = -(beta / len(counted)) * logp - gamma
    return -(2.0 / beta) * -math.log(1.0 + math.exp(-x))  # logsigmoid(x) = -log(1 + exp(-x))


def _simnpo_under_test(logits: torch.Tensor, labels: torch.Tensor, beta: float, gamma: float):
    picked, mask = losses.token_logprobs(logits, labels)
    return losses.simnpo_loss(picked.sum(-1), mask.sum(-1), beta, gamma)


@pytest.mark.parametrize(("beta", "gamma"), [(2.5, 0.0), (2.5, 1.0), (0.7, 3.0)])
def test_simnpo_loss_matches_the_formula_by_hand(beta, gamma):
    value = _simnpo_under_test(torch.tensor([LOGITS]), torch.tensor([LABELS]), beta, gamma)

    expected = _simnpo_by_hand(LOGITS, COUNTED, beta, gamma)
    assert float(value) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    # The same value in closed form, from the mean token NLL n.
    n = -sum(_log_softmax_at(LOGITS[t], k) for t, k in COUNTED) / len(COUNTED)
    closed = (2.0 / beta) * math.log(1.0 + math.exp(gamma - beta * n))
    assert float(value) == pytest.approx(closed, rel=1e-6, abs=1e-7)


def test_simnpo_normalises_each_sequence_by_its_own_length_and_averages_sequences():
    # Row 0: the two counted tokens above. Row 1: one counted token (position 0 predicts label 1).
    rows = [LOGITS, [[0.3, 1.1, -0.2], [0.9, -0.6, 0.1], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]]
    labels = [LABELS, [0, 1, -100, -100]]
    counted = [COUNTED, [(0, 1)]]
    beta, gamma = 2.5, 0.5

    value = _simnpo_under_test(torch.tensor(rows), torch.tensor(labels), beta, gamma)

    per_row = [_simnpo_by_hand(r, c, beta, gamma) for r, c in zip(rows, counted, strict=True)]
    assert float(value) == pytest.approx(sum(per_row) / 2, rel=1e-6)
    # Normalising by the batch's total token count instead would give another number.
    logps = [sum(_log_softmax_at(r[t], k) for t, k in c) for r, c in zip(rows, counted, strict=True)]
    pooled = sum((2 / beta) * math.log(1 + math.exp(gamma + beta * lp / 3)) for lp in logps) / 2
    assert abs(pooled - sum(per_row) / 2) > 1e-3


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_simnpo_gradient_pushes_the_forget_tokens_down(gamma):
    beta = 2.5
    logits = torch.tensor([LOGITS], requires_grad=True)
    _simnpo_under_test(logits, torch.tensor([LABELS]), beta, gamma).backward()
    grad = logits.grad[0]

    # loss = (2/beta) softplus(gamma - beta n) with n = -(1/|y|) sum_t log p_t, so
    # d loss / d log p_t = 2 sigmoid(gamma - beta n) / |y| > 0, and d log p_t / d z_t[y_t] = 1 - p_t[y_t].
    # Raising a correct token's logit makes the forget data more likely, which SimNPO penalises: the
    # derivative is positive, and gradient descent lowers that logit.
    n = -sum(_log_softmax_at(LOGITS[t], k) for t, k in COUNTED) / len(COUNTED)
    weight = 2.0 * _sigmoid(gamma - beta * n) / len(COUNTED)
    for t, k in COUNTED:
        expected = weight * (1.0 - _softmax_at(LOGITS[t], k))
        assert expected > 0
        assert float(grad[t, k]) == pytest.approx(expected, rel=1e-5)
        for other in range(3):
            if other != k:  # d log p_t / d z_t[j] = -p_t[j]: the wrong tokens' logits are pushed up
                assert float(grad[t, other]) == pytest.approx(
                    -weight * _softmax_at(LOGITS[t], other), rel=1e-5
                )
    # The ignored position and the last position (which predicts nothing) get no gradient at all.
    assert torch.equal(grad[2:], torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------------
# activation_mse by hand


def test_activation_mse_by_hand_with_a_masked_position():
    hidden = [[[1.0, 2.0], [3.0, 4.0], [5.0, -1.0]], [[0.0, 0.0], [2.0, 2.0], [-1.0, 1.0]]]
    mask = [[True, False, True], [False, True, True]]
    vector = [0.5, 1.0]

    def by_hand(target_at):
        terms = [
            sum((h - c) ** 2 for h, c in zip(hidden[b][t], target_at(b, t), strict=True)) / 2
            for b in range(2)
            for t in range(3)
            if mask[b][t]
        ]
        return sum(terms) / len(terms)

    value = losses.activation_mse(torch.tensor(hidden), torch.tensor(vector), torch.tensor(mask))
    assert float(value) == pytest.approx(by_hand(lambda b, t: vector), rel=1e-6)
    # The masked positions are far from the target: counting them would change the value.
    assert float(value) != pytest.approx(
        losses.activation_mse(torch.tensor(hidden), torch.tensor(vector), torch.ones(2, 3, dtype=torch.bool))
    )

    # A per-position target [B, T, H] (the retain term's reference hidden states).
    reference = [[[0.0, 1.0], [9.0, 9.0], [4.0, 0.0]], [[9.0, 9.0], [1.0, 3.0], [0.0, 0.0]]]
    value = losses.activation_mse(torch.tensor(hidden), torch.tensor(reference), torch.tensor(mask))
    assert float(value) == pytest.approx(by_hand(lambda b, t: reference[b][t]), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# RMU end to end

RMU_SETTINGS = {
    "method": "rmu",
    "lr": 1e-3,
    "alpha": 10,
    "batch_size": 8,
    "max_steps": 20,  # at 10 steps the top layer's distance to c*u only halves; 20 leave a margin
    "eval_every": 100,
    "checkpoint_every": 1000,
}


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _layer_outputs(path, texts: list[str], layer: int) -> list[torch.Tensor]:
    """Hidden states ``[T, H]`` leaving decoder block ``layer`` (Llama's ``model.layers``), per text,
    tokenised the way unlearning tokenises forget data (ids plus EOS)."""
    model, tokenizer = load_model(path)
    captured = []

    def hook(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach()[0])

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            for text in texts:
                ids = [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]
                model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return captured


def _mean_squared_distance(hiddens: list[torch.Tensor], target: torch.Tensor) -> float:
    return float(torch.cat([(h - target).pow(2).sum(-1) for h in hiddens]).mean())


@pytest.fixture(scope="module", params=[None, 3], ids=["default-layer", "top-layer"])
def rmu_run(request, trained_small, small_benchmark_dir, tmp_path_factory):
    """RMU at the default layer (a quarter of the way up: 1 of 4, where the window is cut off at 0) and at
    the top layer 3 (window 1..3: layer 0's MLP gets gradients there but must not move)."""
    out = tmp_path_factory.mktemp("rmu") / "rmu"
    config = UnlearnConfig(**RMU_SETTINGS, rmu_layer=request.param)
    return config, unlearn_model(
        trained_small.path, small_benchmark_dir, out, config, run=RunContext(progress=False)
    )


def test_rmu_moves_only_the_mlp_weights_of_the_three_layers_up_to_the_steered_one(rmu_run, trained_small):
    config, result = rmu_run
    layer = result.record["terms"]["rmu"]["layer"]
    depth = sum(1 for name in _weights(trained_small.path) if name.endswith(".mlp.down_proj.weight"))
    assert layer == (depth // 4 if config.rmu_layer is None else config.rmu_layer)
    assert result.record["method"] == "rmu" and "act" in result.record["terms"]

    start, end = _weights(trained_small.path), _weights(result.path)
    assert start.keys() == end.keys()
    prefixes = tuple(f"model.layers.{i}.mlp." for i in range(max(0, layer - 2), layer + 1))
    allowed = {name for name in start if name.startswith(prefixes)}
    # gate, up and down projections of each layer in the window
    assert len(allowed) == 3 * len(prefixes)
    frozen_changed = [n for n in start if n not in allowed and not torch.equal(start[n], end[n])]
    assert frozen_changed == []
    assert all(not torch.equal(start[n], end[n]) for n in allowed), "every allowed MLP weight moves"


def test_rmu_steers_forget_hidden_states_toward_the_scaled_random_vector(
    rmu_run, trained_small, small_benchmark_dir
):
    config, result = rmu_run
    layer = result.record["terms"]["rmu"]["layer"]
    benchmark = load_benchmark(small_benchmark_dir)
    texts = benchmark.texts("forget") + [qa_text(p) for p in benchmark.forget_qa]

    start = _layer_outputs(trained_small.path, texts, layer)
    end = _layer_outputs(result.path, texts, layer)
    u = torch.rand(start[0].shape[-1], generator=torch.Generator().manual_seed(config.seed))
    target = config.rmu_coeff * u / u.norm()

    before = _mean_squared_distance(start, target)
    after = _mean_squared_distance(end, target)
    assert after < 0.5 * before, (before, after)
    # Along u the hidden states go from about 0 most of the way to c, and not past it (a target of the
    # wrong length, such as an unnormalised u, overshoots c several times over in these 20 steps).
    along_before = float((torch.cat(start) @ (u / u.norm())).mean())
    along_after = float((torch.cat(end) @ (u / u.norm())).mean())
    assert abs(along_before) < 1.0
    assert config.rmu_coeff / 4 < along_after < 1.25 * config.rmu_coeff, along_after


def test_rmu_method_name_and_configuration_errors(trained_small, small_benchmark_dir, tmp_path):
    spec = parse_method("rmu")
    assert (spec.forget, spec.regularizer, spec.name) == ("rmu", "act", "rmu")
    assert parse_method("rmu+act").name == "rmu"
    with pytest.raises(ConfigError):
        UnlearnConfig(method="rmu", sure_top=0.1)
    with pytest.raises(ConfigError):
        UnlearnConfig(method="rmu", lora_r=4)
    for i, layer in enumerate([4, -1]):  # the tiny model has layers 0..3
        config = UnlearnConfig(**{**RMU_SETTINGS, "max_steps": 1}, rmu_layer=layer)
        with pytest.raises(ConfigError, match="rmu-layer"):
            unlearn_model(
                trained_small.path,
                small_benchmark_dir,
                tmp_path / str(i),
                config,
                run=RunContext(progress=False),
            )


# ---------------------------------------------------------------------------------------------------
# SAM by hand

CURVATURE = (1.0, 3.0)  # L(w) = (w0^2 + 3 w1^2) / 2: not isotropic, so the perturbation turns the gradient


def _bowl_loss(w: list[float]) -> float:
    return sum(c * x * x for c, x in zip(CURVATURE, w, strict=True)) / 2


def _bowl_grad(w: list[float]) -> list[float]:
    return [c * x for c, x in zip(CURVATURE, w, strict=True)]


def _adamw_by_hand(w, steps, lr, rho=None, betas=(0.9, 0.999), eps=1e-8):
    """Plain AdamW (no weight decay) on the bowl, with SAM's gradient when ``rho`` is set.

    Returns the final weights and every point where the loss was evaluated, in order.
    """
    w = list(w)
    m, v, points = [0.0, 0.0], [0.0, 0.0], []
    for t in range(1, steps + 1):
        points.append(list(w))
        g = _bowl_grad(w)
        if rho is not None:
            norm = math.sqrt(sum(x * x for x in g))
            perturbed = [x + rho * gx / norm for x, gx in zip(w, g, strict=True)]
            points.append(perturbed)
            g = _bowl_grad(perturbed)
        m = [betas[0] * a + (1 - betas[0]) * b for a, b in zip(m, g, strict=True)]
        v = [betas[1] * a + (1 - betas[1]) * b * b for a, b in zip(v, g, strict=True)]
        m_hat = [a / (1 - betas[0] ** t) for a in m]
        v_hat = [a / (1 - betas[1] ** t) for a in v]
        w = [x - lr * a / (math.sqrt(b) + eps) for x, a, b in zip(w, m_hat, v_hat, strict=True)]
    return w, points


class _Bowl(torch.nn.Module):
    def __init__(self, start: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
        # Trainable but outside the loss: its gradient stays missing, which SAM must treat as zero.
        self.unused = torch.nn.Parameter(torch.full((1,), 0.25, dtype=torch.float64))


def _run_bowl(start, steps, lr, rho):
    model = _Bowl(start)
    points = []

    def loss_fn(model, batch):
        points.append(model.w.detach().tolist())
        w = model.w
        return (CURVATURE[0] * w[0] ** 2 + CURVATURE[1] * w[1] ** 2) / 2, {}

    config = LoopConfig(
        lr=lr,
        max_steps=steps,
        batch_size=1,
        sam_rho=rho,
        max_grad_norm=None,
        eval_every=1,
        checkpoint_every=100,
    )
    result = run_loop(
        model, config, lambda step, micro: torch.zeros(1), loss_fn, run_key="t", work_dir=None, progress=False
    )
    return model, result, points


START, LR, RHO = [0.2, -0.05], 0.1, 0.1
#: The weights are float64, but the loop takes the gradient norm in float32: 1e-9 relative, far below
#: the 1e-2 by which SAM moves the result here.
TOLERANCE = 1e-8


def test_sam_step_matches_adamw_by_hand():
    model, result, points = _run_bowl(START, steps=2, lr=LR, rho=RHO)
    expected, expected_points = _adamw_by_hand(START, steps=2, lr=LR, rho=RHO)

    # The loss is evaluated at w, then at w + rho g/||g||, on each step.
    assert len(points) == len(expected_points) == 4
    for got, want in zip(points, expected_points, strict=True):
        assert got == pytest.approx(want, abs=TOLERANCE)
    assert model.w.detach().tolist() == pytest.approx(expected, abs=TOLERANCE)
    assert model.unused.item() == 0.25

    # The logged loss is the loss at w, not at the perturbed point.
    assert result.loss_curve == pytest.approx(
        [_bowl_loss(expected_points[0]), _bowl_loss(expected_points[2])]
    )
    assert _bowl_loss(expected_points[1]) > _bowl_loss(expected_points[0]) + 1e-3


def test_without_sam_the_same_run_ends_elsewhere():
    model, _, points = _run_bowl(START, steps=2, lr=LR, rho=None)
    plain, _ = _adamw_by_hand(START, steps=2, lr=LR)
    sam, _ = _adamw_by_hand(START, steps=2, lr=LR, rho=RHO)

    assert len(points) == 2  # one evaluation per step
    assert model.w.detach().tolist() == pytest.approx(plain, abs=TOLERANCE)
    # SAM's gradient changes the result by far more than the tolerance the test above uses.
    assert max(abs(a - b) for a, b in zip(plain, sam, strict=True)) > 1e-3


# ---------------------------------------------------------------------------------------------------
# SAM with SURE, and SimNPO+GDR, end to end


def test_sam_keeps_sure_frozen_weights_bit_identical(trained_small, small_benchmark_dir, tmp_path):
    config = UnlearnConfig(
        method="npo+gdr",
        sure_top=0.1,
        sam_rho=0.05,
        lr=1e-3,
        max_steps=4,
        batch_size=8,
        eval_every=100,
        checkpoint_every=1000,
    )
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "sam", config, run=RunContext(progress=False)
    )
    assert result.record["config"]["sam_rho"] == 0.05
    assert result.record["sure"]["frozen_elements_identical"] is True

    selected = {entry["name"] for entry in result.record["sure"]["selected"]}
    start, end = _weights(trained_small.path), _weights(result.path)
    assert selected and selected <= start.keys() and start.keys() == end.keys()
    changed_unselected = [n for n in start if n not in selected and not torch.equal(start[n], end[n])]
    assert changed_unselected == []
    assert any(not torch.equal(start[n], end[n]) for n in selected)


def test_simnpo_gdr_lowers_forget_recall(trained_small, small_benchmark_dir, tmp_path):
    model, tokenizer = load_model(trained_small.path)
    start_recall = qa_recall(model, tokenizer, load_benchmark(small_benchmark_dir).forget_qa)["value"]
    config = UnlearnConfig(
        method="simnpo+gdr",
        lr=3e-4,
        max_steps=30,
        stop_forget_recall=0.3,
        eval_every=5,
        batch_size=8,
        checkpoint_every=1000,
    )
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "simnpo", config, run=RunContext(progress=False)
    )
    assert result.record["method"] == "simnpo+gdr"
    assert start_recall > 0.5
    assert result.record["final"]["recall_forget"] <= 0.3 < start_recall
    assert result.record["stopped_early"]
