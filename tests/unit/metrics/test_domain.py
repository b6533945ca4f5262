"""Tests of moe/metrics/domain.py (and the routing-by-domain counts of moe/nn/stats.py): the per-source
expert counts add up to the layer's own per-expert counts, the specialisation score is scikit-learn's
mutual information over the source entropy, and reading the window clears it (CPU, under a second)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import mutual_info_score

from moe.metrics import domain_metrics, router_metrics, set_token_sources
from moe.metrics.domain import specialisation
from tests.helpers import layer


@pytest.mark.parametrize("top_k", [1, 2])
def test_domain_counts_split_the_layers_own_counts_by_source(top_k):
    torch.manual_seed(0)
    moe = layer(f"model.moe.top_k={top_k}")
    moe.train()
    sources = np.array([0, 2, 1, 0, 2, 2])  # 6 sequences of 5 tokens, 3 sources
    set_token_sources({0: moe}, sources, 5, 3)
    moe(torch.randn(6, 5, 16))
    moe(torch.randn(6, 5, 16))
    domain = moe.stats.domain.clone()
    assert domain.shape == (3, 4)
    torch.testing.assert_close(domain.sum(0), moe.stats.tokens_per_expert)  # every routed pair, once
    torch.testing.assert_close(domain.sum(1), torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64) * 2 * 5 * top_k)
    out = domain_metrics({0: moe})
    rows = np.array(out["router/layer0/domain"])
    np.testing.assert_allclose(rows, (domain / domain.sum(1, keepdim=True)).numpy(), atol=1e-6)
    assert out["router/layer0/specialisation"] == pytest.approx(specialisation(domain.numpy()))
    assert moe.stats.domain is None and domain_metrics({0: moe}) == {}
    assert "router/layer0/load" in router_metrics({0: moe})  # the other statistics are untouched


def test_expert_choice_counts_the_pairs_the_experts_kept():
    """Expert choice lists every expert for every token; the domain counts only the (token, expert) pairs
    the experts kept (capacity 1.0: each of the 4 experts keeps 30 * 2 / 4 = 15 of the 30 tokens)."""
    torch.manual_seed(0)
    moe = layer("model.moe.router=expert_choice", "model.moe.capacity_factor=1.0", "model.moe.top_k=2")
    moe.train()
    set_token_sources({0: moe}, np.array([0, 2, 1, 0, 2, 2]), 5, 3)
    moe(torch.randn(6, 5, 16))
    domain = moe.stats.domain
    assert domain.shape == (3, 4) and float(domain.sum()) == 4 * 15
    torch.testing.assert_close(domain.sum(0), moe.stats.tokens_per_expert)
    assert domain_metrics({0: moe})["router/layer0/specialisation"] >= 0


def test_no_sources_no_counts():
    moe = layer()
    moe.train()
    moe(torch.randn(2, 3, 16))
    assert moe.stats.domain is None and domain_metrics({0: moe}) == {}


def test_specialisation_is_normalised_mutual_information():
    rng = np.random.default_rng(0)
    for _ in range(5):
        counts = rng.integers(0, 50, (3, 8)).astype(float)
        p = counts.sum(1) / counts.sum()
        h = -np.sum(p * np.log(p))
        assert specialisation(counts) == pytest.approx(mutual_info_score(None, None, contingency=counts) / h)
    assert specialisation(np.ones((2, 4))) == pytest.approx(0.0)  # sources use the experts alike
    assert specialisation(np.array([[5.0, 5, 0, 0], [0, 0, 3, 7]])) == pytest.approx(1.0)  # experts tell the source
    assert specialisation(np.array([[1.0, 2, 3]])) == 0.0 and specialisation(np.zeros((2, 2))) == 0.0
