"""The faiss kNN against a brute-force torch implementation: same neighbours, same votes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from roseprior.knn import knn_predict, knn_search, knn_vote, l2_normalize


def _torch_knn(train: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, k: int, num_classes: int,
               temperature: float, vote: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DINO eval_knn recipe written out densely: cosine matrix, topk, one-hot votes."""
    train = torch.nn.functional.normalize(train.double(), dim=1)
    query = torch.nn.functional.normalize(query.double(), dim=1)
    sims, idx = (query @ train.T).topk(k, dim=1)
    weights = (sims / temperature).exp() if vote == "weighted" else torch.ones_like(sims)
    one_hot = torch.nn.functional.one_hot(labels[idx], num_classes).double()
    scores = (one_hot * weights.unsqueeze(-1)).sum(1)
    return sims, idx, scores / scores.sum(1, keepdim=True)


@pytest.fixture
def features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(500, 32, generator=gen) * torch.rand(500, 1, generator=gen) * 5  # varied norms
    labels = torch.randint(0, 4, (500,), generator=gen)
    query = torch.randn(64, 32, generator=gen)
    return train, labels, query


@pytest.mark.parametrize("k", [1, 5, 20, 50])
def test_search_matches_bruteforce(features, k):
    train, labels, query = features
    sims, idx = knn_search(train, query, k)
    ref_sims, ref_idx, _ = _torch_knn(train, labels, query, k, 4, 0.07, "weighted")
    assert sims.shape == idx.shape == (64, k)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_allclose(sims, ref_sims.numpy(), atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 1e-6), "neighbours must be sorted by decreasing similarity"


@pytest.mark.parametrize("vote", ["weighted", "majority"])
@pytest.mark.parametrize("k", [1, 10, 20])
def test_votes_match_bruteforce(features, vote, k):
    train, labels, query = features
    probs = knn_predict(train, labels, query, num_classes=4, k=k, temperature=0.07, vote=vote)
    _, _, ref = _torch_knn(train, labels, query, k, 4, 0.07, vote)
    assert probs.shape == (64, 4)
    np.testing.assert_allclose(probs, ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_vote_on_a_larger_search_equals_a_fresh_search(features):
    """A k grid searches once at the largest k and slices: the result must equal a search at each k."""
    train, labels, query = features
    sims, idx = knn_search(train, query, 50)
    for k in (1, 5, 20):
        sliced = knn_vote(sims, labels.numpy()[idx], 4, k=k)
        np.testing.assert_allclose(sliced, knn_predict(train, labels, query, 4, k=k), atol=1e-6)


def test_self_query_finds_itself_and_k_is_clipped():
    train = l2_normalize(np.random.default_rng(1).normal(size=(7, 8)))
    sims, idx = knn_search(train, train, k=20)
    assert idx.shape == (7, 7)
    np.testing.assert_array_equal(idx[:, 0], np.arange(7))
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)


def test_majority_vote_counts_neighbours():
    sims = np.array([[0.9, 0.8, 0.1]])
    probs = knn_vote(sims, np.array([[1, 0, 0]]), num_classes=2, vote="majority")
    np.testing.assert_allclose(probs, [[2 / 3, 1 / 3]], atol=1e-6)
    # The weighted vote favours the much closer neighbour instead.
    assert knn_vote(sims, np.array([[1, 0, 0]]), num_classes=2)[0, 1] > 0.5


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="dimension"):
        knn_search(np.ones((3, 4)), np.ones((2, 5)), 1)
    with pytest.raises(ValueError, match="labels"):
        knn_predict(np.ones((3, 4)), [0, 1], np.ones((2, 4)), 2)
    with pytest.raises(ValueError, match="vote"):
        knn_vote(np.ones((1, 1)), np.zeros((1, 1), dtype=int), 2, vote="mean")


@pytest.mark.parametrize("engine", ["faiss", "blas", "auto"])
def test_every_exact_engine_finds_the_same_neighbours(features, engine):
    import roseprior.knn as knn

    train, labels, query = features
    knn._FASTER.clear()
    sims, idx = knn_search(train, query, 20, engine=engine)
    ref_sims, ref_idx, _ = _torch_knn(train, labels, query, 20, 4, 0.07, "weighted")
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_allclose(sims, ref_sims.numpy(), atol=1e-5)
    if engine == "auto":  # the first search of a size class measured both engines and kept the faster
        assert list(knn._FASTER.values())[0] in ("faiss", "blas")


def _clustered(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    """Embeddings as real ones are: clusters (classes, cell types), not noise."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim)).astype(np.float32)
    return means[rng.integers(centres, size=n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)


def test_the_approximate_index_keeps_recall_at_20_and_switches_at_its_threshold():
    train, query = _clustered(20_000, 64, 50, 0), _clustered(300, 64, 50, 1)
    _, exact = knn_search(train, query, 20, engine="blas")
    _, approx = knn_search(train, query, 20, approximate_above=10_000)
    recall = np.mean([len(set(a) & set(e)) / 20 for a, e in zip(approx, exact, strict=True)])
    print(f"IVF recall@20 on 20,000 clustered embeddings: {recall:.3f}")
    assert recall >= 0.95 and (approx >= 0).all()
    # Under the threshold: the exact search. The same engine as the reference, so that a tie of two equally near
    # rows is broken alike (faiss and BLAS order them differently; the measured engine varies with the machine).
    _, below = knn_search(train, query, 20, engine="blas", approximate_above=50_000)
    np.testing.assert_array_equal(below, exact)


def test_the_probes_pass_their_threshold_to_the_search():
    from roseprior.probes import ProbeProtocol, fit_probes

    train, query = _clustered(3000, 16, 4, 2), _clustered(200, 16, 4, 3)
    labels = np.arange(3000) % 2
    fitted = fit_probes(ProbeProtocol(knn_k=[5], linear_c=[1.0], knn_approximate_above=1000), train, labels,
                        query, np.arange(200) % 2, 2)
    assert fitted.knn.approximate_above == 1000
    with pytest.raises(Exception, match="knn_approximate_above"):
        ProbeProtocol(knn_approximate_above=0)
