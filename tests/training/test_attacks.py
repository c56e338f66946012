"""Properties of the attacks (ism_edge_training.attacks) on a small classifier trained on real CIFAR-10 samples."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from ism_edge_training.attacks import (  # noqa: E402
    FGSM,
    PGD,
    AdaptiveAttack,
    Attack,
    SquareAttack,
    bpda,
    make_attack,
)
from ism_edge_training.attacks.adaptive import _SurrogateDefense  # noqa: E402
from ism_edge_training.bundle import DefenseBundle  # noqa: E402
from ism_edge_training.defense import Defense  # noqa: E402
from ism_edge_training.models import Classifier, preset  # noqa: E402
from tests.conftest import CIFAR_TEST, CIFAR_TRAIN  # noqa: E402

EPS = 8 / 255
N_ATTACK = 64  # test images attacked
CALIB = slice(200, 600)  # clean test images used to set detector thresholds


def _load(path) -> tuple[torch.Tensor, torch.Tensor]:
    z = np.load(path)
    x = torch.from_numpy(z["x"]).permute(0, 3, 1, 2).float().div(255.0)
    return x.contiguous(), torch.from_numpy(z["y"]).long()


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These small batches run faster on one thread than on two, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    x_train, y_train = _load(CIFAR_TRAIN)
    x_test, y_test = _load(CIFAR_TEST)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


@pytest.fixture(scope="module")
def model(data) -> Classifier:
    """The small classifier trained for 2 epochs on the 2,000 committed training images (~3 s)."""
    torch.manual_seed(0)
    m = Classifier(preset("small"))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x, y = data["x_train"], data["y_train"]
    for _ in range(2):
        m.train()
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    m.zero_grad(set_to_none=True)
    return m


@pytest.fixture(scope="module")
def batch(data) -> tuple[torch.Tensor, torch.Tensor]:
    return data["x_test"][:N_ATTACK], data["y_test"][:N_ATTACK]


@pytest.fixture(scope="module")
def bundle(model, data) -> DefenseBundle:
    """Bundle with the trained classifier, untrained M and P, thresholds at clean 95th percentiles."""
    torch.manual_seed(1)
    b = DefenseBundle.create(preset("small"), [f"c{i}" for i in range(10)], preset="small")
    b.classifier.load_state_dict(model.state_dict())
    b.label_source = "auto"
    b.eval()
    with torch.no_grad():
        clean = Defense(b)(data["x_test"][CALIB])
    b.thresholds = {k: float(torch.quantile(v, 0.95)) for k, v in clean.scores().items()}
    return b


@pytest.fixture(scope="module")
def defense(bundle) -> Defense:
    return Defense(bundle).eval()


def _defended(defense: Defense, x: torch.Tensor, y: torch.Tensor) -> float:
    """MagNet's defended fraction: flagged or correctly classified."""
    with torch.no_grad():
        out = defense(x)
    return (out.flagged | (out.label == y)).float().mean().item()


def _attacks(model, defense):
    return {
        "fgsm": FGSM(model, EPS),
        "pgd": PGD(model, EPS, steps=10, seed=0),
        "square": SquareAttack(model, EPS, n_queries=100, seed=0),
        "adaptive": AdaptiveAttack(defense, EPS, steps=5, seed=0),
    }


def test_classifier_beats_chance(model, data):
    assert _accuracy(model, data["x_test"], data["y_test"]) > 0.30


@pytest.mark.parametrize("name", ["fgsm", "pgd", "square", "adaptive"])
def test_output_within_eps_and_pixel_range(name, model, defense, batch):
    x, y = batch
    x_adv = _attacks(model, defense)[name](x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert not x_adv.requires_grad
    assert (x_adv != x).any()


@pytest.mark.parametrize("name", ["fgsm", "pgd", "square"])
def test_zero_eps_returns_input_and_clean_accuracy(name, model, batch):
    x, y = batch
    x_adv = make_attack(name, model, 0.0)(x, y)
    assert torch.equal(x_adv, x)
    assert _accuracy(model, x_adv, y) == _accuracy(model, x, y)


def test_zero_eps_adaptive_returns_input(defense, batch):
    x, y = batch
    assert torch.equal(AdaptiveAttack(defense, 0.0, steps=2)(x, y), x)


def test_attacks_lower_accuracy_and_pgd_at_least_as_strong_as_fgsm(model, batch):
    x, y = batch
    clean = _accuracy(model, x, y)
    fgsm = _accuracy(model, FGSM(model, EPS)(x, y), y)
    pgd = _accuracy(model, PGD(model, EPS, steps=10, seed=0)(x, y), y)
    assert fgsm < clean
    assert pgd <= fgsm


def test_more_pgd_steps_never_help_the_defender(model, batch):
    x, y = batch
    accs = [_accuracy(model, PGD(model, EPS, steps=s, seed=0)(x, y), y) for s in (1, 5, 20)]
    noise = 2 / len(y)
    assert accs[1] <= accs[0] + noise and accs[2] <= accs[1] + noise


def test_pgd_restarts_keep_the_first_successful_restart(model, batch):
    x, y = batch
    eps = 2 / 255
    one = PGD(model, eps, steps=3, seed=0)(x, y)
    three = PGD(model, eps, steps=3, restarts=3, seed=0)(x, y)
    with torch.no_grad():
        fooled_one = model(one).argmax(1) != y
        fooled_three = model(three).argmax(1) != y
    assert bool((fooled_three | ~fooled_one).all())  # fooled by the first restart stays fooled
    assert torch.equal(three[fooled_one], one[fooled_one])
    assert fooled_three.sum() >= fooled_one.sum()


def test_seeded_attacks_are_repeatable(model, batch):
    x, y = batch
    assert torch.equal(PGD(model, EPS, steps=3, seed=7)(x, y), PGD(model, EPS, steps=3, seed=7)(x, y))
    sq = SquareAttack(model, EPS, n_queries=20, seed=7)
    assert torch.equal(sq(x, y), sq(x, y))


def test_square_lowers_accuracy_without_gradients(model, batch):
    x, y = batch
    x_adv = SquareAttack(model, EPS, n_queries=100, seed=0)(x, y)
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert _accuracy(model, x_adv, y) < _accuracy(model, x, y)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["fgsm", "pgd", "square", "adaptive"])
def test_modes_restored_eval_during_attack_and_no_parameter_grad(name, model, defense, batch):
    x, y = batch
    net = defense if name == "adaptive" else model
    net.train()
    first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.eval()  # a mixed state must come back exactly
    before = {n: m.training for n, m in net.named_modules()}
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    seen: list[bool] = []
    hook = bn.register_forward_pre_hook(lambda mod, inp: seen.append(mod.training))
    try:
        _attacks(model, defense)[name](x[:16], y[:16])
    finally:
        hook.remove()
        after = {n: m.training for n, m in net.named_modules()}
        net.eval()
    assert after == before
    assert seen and not any(seen)  # BatchNorm ran in eval mode
    assert torch.equal(bn.running_mean, stats)
    assert all(p.grad is None for p in net.parameters())


def test_modes_restored_when_the_attack_fails(model):
    class Broken(Attack):
        def perturb(self, x, y):
            raise RuntimeError("boom")

    model.train()
    try:
        with pytest.raises(RuntimeError):
            Broken(model, EPS)(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
        assert all(m.training for m in model.modules())
    finally:
        model.eval()


@pytest.mark.parametrize(
    "build",
    [
        lambda m, d: FGSM(m, -0.1),
        lambda m, d: FGSM(m, 1.5),
        lambda m, d: FGSM(m, math.nan),
        lambda m, d: PGD(m, EPS, steps=0),
        lambda m, d: PGD(m, EPS, alpha=-1.0),
        lambda m, d: PGD(m, EPS, restarts=0),
        lambda m, d: PGD(m, EPS, restarts=2, random_start=False),
        lambda m, d: PGD(m, EPS, seed=-1),
        lambda m, d: SquareAttack(m, EPS, n_queries=0),
        lambda m, d: SquareAttack(m, EPS, p_init=0.0),
        lambda m, d: SquareAttack(m, EPS, p_init=1.5),
        lambda m, d: AdaptiveAttack(d, EPS, steps=0),
        lambda m, d: AdaptiveAttack(d, EPS, lam=-1.0),
        lambda m, d: AdaptiveAttack(d, EPS, bpda="everything"),
        lambda m, d: AdaptiveAttack(d, EPS, loss="hinge"),
        lambda m, d: AdaptiveAttack(m, EPS),  # a bare classifier is not a defense
        lambda m, d: make_attack("cw", m, EPS),
        lambda m, d: make_attack("fgsm", m, EPS, steps=10),
    ],
)
def test_invalid_parameters_raise_value_error(build, model, defense):
    with pytest.raises(ValueError, match="must|choose|option|needs"):
        build(model, defense)


def test_invalid_inputs_raise_value_error(model):
    attack = FGSM(model, EPS)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack(torch.full((2, 3, 32, 32), 255.0), y)
    with pytest.raises(ValueError, match="NCHW"):
        attack(torch.zeros(3, 32, 32), y)
    with pytest.raises(ValueError, match="one label per image"):
        attack(torch.zeros(2, 3, 32, 32), torch.zeros(3, dtype=torch.long))


def test_make_attack_builds_the_named_attack(model):
    pgd = make_attack("PGD", model, EPS, steps=4, seed=1)
    assert isinstance(pgd, PGD) and pgd.steps == 4 and pgd.alpha == pytest.approx(2.5 * EPS / 4)
    assert isinstance(make_attack("square", model, EPS, n_queries=10), SquareAttack)
    assert isinstance(make_attack("fgsm", model, EPS), FGSM)


def test_bpda_is_exact_forward_and_identity_backward():
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    out = bpda(lambda v: torch.round(v * 4) / 4, x)
    assert torch.equal(out, torch.round(x.detach() * 4) / 4)
    w = torch.randn_like(x)
    (g,) = torch.autograd.grad((out * w).sum(), [x])
    assert torch.equal(g, w)
    with pytest.raises(ValueError, match="shape"):
        bpda(lambda v: v.flatten(1), x)


@pytest.fixture(scope="module")
def feedback_defense(bundle) -> Defense:
    """The defense with a reconstruction threshold so low that every input gets 2 feedback rounds."""
    d = Defense(bundle, feedback_rounds=2).eval()
    d.feedback_threshold = 1e-9
    return d


@pytest.mark.parametrize("mode", ["feedback", "mapper"])
@pytest.mark.parametrize("feedback", [False, True])
def test_bpda_surrogate_defense_has_the_defense_forward_values(mode, feedback, defense, feedback_defense, batch):
    d = feedback_defense if feedback else defense
    x = batch[0][:8]
    with torch.no_grad():
        ref = d(x)
        sur = _SurrogateDefense(d, mode)(x)
        first_pass = d.mapper(x)
    assert torch.equal(ref.x_hat, first_pass) != feedback  # the feedback loop did (not) run
    for field in ("x_hat", "logits", "recon_error", "jsd", "p_score", "flagged"):
        assert torch.equal(getattr(sur, field), getattr(ref, field)), field


@pytest.mark.parametrize("mode", [False, "feedback", True])
def test_adaptive_objective_has_a_gradient_through_the_feedback_loop(mode, feedback_defense, batch):
    x, y = batch[0][:8].clone().requires_grad_(True), batch[1][:8]
    attack = AdaptiveAttack(feedback_defense, EPS, bpda=mode)
    (g,) = torch.autograd.grad(attack.objective(attack._forward(x), y).sum(), [x])
    assert torch.isfinite(g).all() and (g != 0).float().mean() > 0.5
    assert all(p.grad is None for p in feedback_defense.parameters())


def test_adaptive_attack_beats_plain_pgd_against_the_defense(model, defense, batch):
    """Defended fraction (flagged or correct) under the adaptive attack < under PGD on C alone."""
    x, y = batch
    x_pgd = PGD(model, EPS, steps=10, seed=0)(x, y)
    x_adaptive = AdaptiveAttack(defense, EPS, steps=20, seed=0)(x, y)
    assert (x_adaptive - x).abs().max().item() <= EPS + 1e-6
    assert x_adaptive.min().item() >= 0.0 and x_adaptive.max().item() <= 1.0
    assert _defended(defense, x_adaptive, y) < _defended(defense, x_pgd, y)


def test_detector_evasion_term_lowers_the_flag_rate(defense, batch):
    x, y = batch
    flagged = {}
    for lam in (0.0, 1.0):
        x_adv = AdaptiveAttack(defense, EPS, steps=10, seed=0, lam=lam)(x, y)
        with torch.no_grad():
            flagged[lam] = defense(x_adv).flagged.float().mean().item()
    assert flagged[1.0] < flagged[0.0]


@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_adaptive_classification_losses_fool_the_unflagged_path(loss, defense, batch):
    x, y = batch[0][:32], batch[1][:32]
    x_adv = AdaptiveAttack(defense, EPS, steps=10, seed=0, loss=loss)(x, y)
    with torch.no_grad():
        out = defense(x_adv)
    assert (~out.flagged & (out.label != y)).float().mean() > 0.5


@pytest.mark.parametrize("bpda_mode", [True, "feedback"])
def test_adaptive_attack_with_bpda_lowers_the_defended_fraction(bpda_mode, defense, batch):
    x, y = batch[0][:32], batch[1][:32]
    x_adv = AdaptiveAttack(defense, EPS, steps=10, seed=0, bpda=bpda_mode)(x, y)
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert _defended(defense, x_adv, y) < _defended(defense, x, y)


def test_adaptive_attack_without_thresholds_attacks_the_classifier(bundle, batch):
    x, y = batch[0][:32], batch[1][:32]
    d = Defense(bundle).eval()
    d.thresholds = {}
    attack = AdaptiveAttack(d, EPS, steps=3, seed=0)
    assert attack.thresholds == {}
    x_adv = attack(x, y)
    with torch.no_grad():
        clean, adv = d(x), d(x_adv)
    assert not adv.flagged.any()
    assert (adv.label == y).float().mean() < (clean.label == y).float().mean()


def test_adaptive_attack_started_from_smaller_budget_examples_is_never_weaker(defense, batch):
    """Nested budgets: a run at 4ε started from the ε examples keeps every input they got through."""
    x, y = batch
    small = AdaptiveAttack(defense, EPS, steps=10, seed=0)(x, y)
    big = AdaptiveAttack(defense, 4 * EPS, steps=2, seed=0)(x, y, start=small)
    assert (big - x).abs().max().item() <= 4 * EPS + 1e-6
    assert _defended(defense, big, y) <= _defended(defense, small, y)
    with pytest.raises(ValueError, match="start must be a tensor shaped like x"):
        AdaptiveAttack(defense, EPS, steps=1)(x, y, start=small[:2])


def test_pgd_started_from_smaller_budget_examples_is_never_weaker(model, batch):
    """Nested budgets for PGD: samples its own run leaves unfooled get a run from the ε examples."""
    x, y = batch
    small = PGD(model, EPS, steps=10, seed=0)(x, y)
    big = PGD(model, 4 * EPS, steps=1, alpha=1e-6, seed=0)(x, y, start=small)  # a useless own run
    assert (big - x).abs().max().item() <= 4 * EPS + 1e-6
    with torch.no_grad():
        fooled_small = model(small).argmax(1) != y
        fooled_big = model(big).argmax(1) != y
    assert bool(fooled_big[fooled_small].all())
    with pytest.raises(ValueError, match="start must be a tensor shaped like x"):
        PGD(model, EPS, steps=1)(x, y, start=small[:2])
    with pytest.raises(ValueError, match="FGSM does not take a start"):
        FGSM(model, EPS)(x, y, start=small)
