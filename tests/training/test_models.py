"""Properties of the defense's networks (paper Tables 1 and 2)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ism_edge_training.models import (  # noqa: E402
    PRESETS,
    Classifier,
    MappingNetwork,
    ModelConfig,
    PerturbationClassifier,
    ScaledLogits,
    js_divergence,
    k_sparse,
    preset,
)
from ism_edge_training.models.networks import factor_classifier  # noqa: E402


@pytest.mark.parametrize("k", [1, 7, 32, 128])
def test_k_sparse_keeps_exactly_k_largest(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    z = torch.randn(16, 128, generator=g)
    s = k_sparse(z, k)
    assert ((s != 0).sum(dim=1) == k).all()
    kept = s != 0
    # every kept magnitude is >= every dropped magnitude, and kept values are unchanged
    assert (z.abs()[kept].view(16, k).min(dim=1).values >= z.abs().masked_fill(kept, -1).max(dim=1).values).all()
    assert torch.equal(s[kept], z[kept])


@pytest.mark.parametrize("name", list(PRESETS))
def test_mapper_code_is_k_sparse_and_output_matches_input(name: str) -> None:
    cfg = preset(name)
    m = MappingNetwork(cfg).eval()
    x = torch.rand(2, cfg.channels, cfg.image_size, cfg.image_size)
    x_hat, z = m.forward_with_code(x)
    assert x_hat.shape == x.shape
    assert ((z != 0).sum(dim=1) == cfg.sparsity_k).all()
    assert x_hat.min() >= 0 and x_hat.max() <= 1


@pytest.mark.parametrize("name", list(PRESETS))
def test_classifier_and_perturbation_shapes(name: str) -> None:
    cfg = preset(name)
    x = torch.rand(3, cfg.channels, cfg.image_size, cfg.image_size)
    assert Classifier(cfg).eval()(x).shape == (3, cfg.num_classes)
    assert PerturbationClassifier(cfg)(x).shape == (3,)


def test_paper_preset_has_the_papers_sizes() -> None:
    cfg = PRESETS["paper"]
    assert cfg.clf_widths == (128, 256, 128, 64) and cfg.clf_dense == 1024
    assert cfg.map_widths == (64, 128, 256, 256) and cfg.latent_dim == 128 and cfg.sparsity_k == 32
    assert cfg.map_skip is False and not any(n.startswith("skip.") for n in MappingNetwork(cfg).state_dict())


def test_the_residual_decoder_path_carries_detail_the_code_cannot() -> None:
    cfg = preset("small", map_skip=True)
    m = MappingNetwork(cfg).eval()
    assert "skip.weight" in m.state_dict()
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        # Same code for both images (the sparse code alone would give the same output), other detail.
        za = m.encoder(a)
        qa, qb = m.encoder[:4](a), m.encoder[:4](b)
        from ism_edge_training.models import k_sparse as ks

        za = ks(za, cfg.sparsity_k)
        assert not torch.allclose(m.decode(za, qa), m.decode(za, qb))
        assert torch.allclose(m.decode(za, qa), m(a), atol=1e-6)
    with pytest.raises(ValueError, match="residual path"):
        m.decode(za)
    # Bundles written before the field existed load as the paper's structure.
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "map_skip"}).map_skip is False


@pytest.mark.parametrize("bad", [dict(image_size=40), dict(sparsity_k=0), dict(sparsity_k=200), dict(num_classes=1),
                                 dict(channels=2), dict(clf_rank=-1), dict(clf_rank=2000)])
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_config_round_trip() -> None:
    cfg = preset("celeba64", sparsity_k=16)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_factored_dense_layer_is_the_truncated_svd() -> None:
    """At full rank the factored classifier is the same function; below it, the reported error is
    the truncated SVD's (Eckart–Young), and the layer holds rank × (flat + dense) weights."""
    torch.manual_seed(0)
    cfg = preset("small")
    clf = Classifier(cfg).eval()
    x = torch.rand(16, 3, 32, 32)
    full, err = factor_classifier(clf, cfg, cfg.clf_dense)
    assert err < 1e-6 and not full.training
    torch.testing.assert_close(full(x), clf(x), rtol=1e-4, atol=1e-5)
    low, err = factor_classifier(clf, cfg, 16)
    w = clf.head[1].weight.detach()
    w16 = low.head[2].weight.detach() @ low.head[1].weight.detach()
    assert err == pytest.approx(float((w - w16).norm() / w.norm()), rel=1e-4)
    s = torch.linalg.svdvals(w.double())
    assert err == pytest.approx(float(s[16:].norm() / s.norm()), rel=1e-4)
    flat = cfg.clf_widths[3] * 16 * 16
    assert low.head[1].weight.shape == (16, flat) and low.head[1].bias is None
    assert sum(p.numel() for p in low.head[1:3].parameters()) == 16 * (flat + cfg.clf_dense) + cfg.clf_dense
    # The factored network is what a config with clf_rank builds: it loads into one.
    Classifier(replace(cfg, clf_rank=16)).load_state_dict(low.state_dict())
    with pytest.raises(ValueError, match="already factored"):
        factor_classifier(low, replace(cfg, clf_rank=16), 8)


def test_scaled_logits_keeps_the_label() -> None:
    clf = Classifier(preset("small")).eval()
    x = torch.rand(8, 3, 32, 32)
    assert torch.equal(ScaledLogits(clf, 0.05)(x).argmax(1), clf(x).argmax(1))


def test_jsd_is_the_runtimes_to_float_precision_even_for_nearly_equal_outputs() -> None:
    """Nearly equal distributions (a classifier with tiny logits at T = 10): float32 would cancel
    to ±1e-7 noise, so a threshold calibrated on it would flip flags between PyTorch and the engines."""
    from ism_edge.scores import jsd

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 10, generator=g) * 1e-2
    b = a + torch.randn(64, 10, generator=g) * 1e-4
    ours = js_divergence(a, b, 10.0)
    assert ours.dtype == torch.float32 and bool((ours >= 0).all())
    np.testing.assert_allclose(ours.numpy(), jsd(a.numpy(), b.numpy(), 10.0), rtol=1e-5, atol=1e-15)
    a.requires_grad_(True)
    js_divergence(a, b + 1.0, 10.0).sum().backward()  # the adaptive attack's gradients still flow
    assert a.grad is not None and a.grad.dtype == torch.float32
