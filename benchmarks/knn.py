"""faiss kNN (roseprior.knn) against scikit-learn's brute-force KNeighborsClassifier: time and agreement.

    python benchmarks/knn.py            # 100,000 x 768 train features, 1,000 queries, k = 20
    python benchmarks/knn.py --quick    # 10,000 x 256, 200 queries
    python benchmarks/knn.py --approximate [--n 1000000]   # the IVF index against exact search, 1M x 768

Both search exact cosine neighbours (sklearn: metric="cosine", algorithm="brute"), so the top-k must
be identical; the majority vote must then give identical class probabilities. Prints both times and
the ratio. Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np


def measure(argv: list[str] | None = None) -> dict[str, Any]:
    """Both times and the agreement for the command line ``argv`` (see ``--help``); prints as it goes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 x 256 features, 200 queries")
    parser.add_argument("--n", type=int, default=None, help="train features (default 100,000; quick 10,000)")
    parser.add_argument("--dim", type=int, default=None, help="feature dimension (default 768; quick 256)")
    parser.add_argument("--queries", type=int, default=None, help="query features (default 1,000; quick 200)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = args.n or (10_000 if args.quick else 100_000)
    dim = args.dim or (256 if args.quick else 768)
    queries = args.queries or (200 if args.quick else 1_000)

    import faiss
    from sklearn.neighbors import KNeighborsClassifier

    import roseprior.knn as knn
    from roseprior.knn import knn_predict, knn_search

    rng = np.random.default_rng(args.seed)
    train = rng.standard_normal((n, dim), dtype=np.float32)
    labels = rng.integers(0, args.classes, n)
    query = rng.standard_normal((queries, dim), dtype=np.float32)
    print(f"kNN benchmark: {n:,} x {dim} train, {queries:,} queries, k={args.k}; faiss {faiss.__version__} "
          f"({'GPU' if faiss.get_num_gpus() else 'CPU'}), {faiss.omp_get_max_threads()} threads")

    knn_search(train, query, args.k)  # outside the timing: faiss's library loads, the engine is measured and kept
    engine = knn._FASTER.get(next(iter(knn._FASTER), None), "faiss")
    start = time.perf_counter()
    _, faiss_idx = knn_search(train, query, args.k)
    faiss_probs = knn_predict(train, labels, query, args.classes, k=args.k, vote="majority")
    faiss_s = time.perf_counter() - start

    start = time.perf_counter()
    clf = KNeighborsClassifier(n_neighbors=args.k, algorithm="brute", metric="cosine").fit(train, labels)
    sk_idx = clf.kneighbors(query, return_distance=False)
    sk_probs = clf.predict_proba(query)
    sklearn_s = time.perf_counter() - start

    same_sets = np.mean([set(a) == set(b) for a, b in zip(faiss_idx, sk_idx, strict=True)])
    same_order = np.mean(np.all(faiss_idx == sk_idx, axis=1))
    max_prob_diff = float(np.abs(faiss_probs - sk_probs).max())
    print(f"roseprior.knn ({engine}): {faiss_s:8.3f} s (search + search-and-vote)")
    print(f"sklearn : {sklearn_s:8.3f} s (fit + kneighbors + predict_proba)")
    print(f"ratio   : sklearn / faiss = {sklearn_s / faiss_s:.1f}x")
    print(f"agreement: identical top-{args.k} sets {same_sets:.2%}, identical order {same_order:.2%}, "
          f"max |majority-vote prob diff| {max_prob_diff:.2e}")
    return {
        "n": n, "dim": dim, "queries": queries, "k": args.k, "faiss_version": faiss.__version__,
        "faiss_gpu": bool(faiss.get_num_gpus()), "threads": faiss.omp_get_max_threads(), "engine": engine,
        "faiss_s": faiss_s, "sklearn_s": sklearn_s, "ratio": sklearn_s / faiss_s,
        "same_sets": float(same_sets), "same_order": float(same_order), "max_prob_diff": max_prob_diff,
        "agree": bool(same_sets == 1.0 and max_prob_diff < 1e-6),
    }


def approximate(n: int = 1_000_000, dim: int = 768, queries: int = 1_000, k: int = 20, seed: int = 0) -> dict[str, Any]:
    """The IVF index (``knn_search(..., approximate_above=...)``) against scikit-learn's exact brute force on
    clustered embeddings (as real ones are): build and search time, and recall@k of the exact neighbours."""
    from sklearn.neighbors import NearestNeighbors

    from roseprior.knn import ivf_index, l2_normalize

    rng = np.random.default_rng(seed)
    means = rng.standard_normal((1000, dim)).astype(np.float32)
    train = l2_normalize(means[rng.integers(1000, size=n)] + rng.standard_normal((n, dim), dtype=np.float32))
    query = l2_normalize(means[rng.integers(1000, size=queries)] + rng.standard_normal((queries, dim), dtype=np.float32))
    start = time.perf_counter()
    index = ivf_index(train)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    _, approx = index.search(query, k)
    ivf_s = time.perf_counter() - start
    start = time.perf_counter()
    exact = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(train).kneighbors(
        query, return_distance=False)
    sklearn_s = time.perf_counter() - start
    recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)]))
    print(f"approximate kNN, {n:,} x {dim} clustered embeddings, {queries:,} queries, k={k}: IVF search {ivf_s:.2f} s "
          f"(build {build_s:.1f} s), scikit-learn brute force {sklearn_s:.1f} s: search {sklearn_s / ivf_s:.1f}x, "
          f"build + search {sklearn_s / (build_s + ivf_s):.1f}x; recall@{k} {recall:.3f}")
    return {"n": n, "dim": dim, "queries": queries, "k": k, "build_s": build_s, "ivf_s": ivf_s, "sklearn_s": sklearn_s,
            "ratio": sklearn_s / ivf_s, "recall": recall}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        import sys

        argv = sys.argv[1:]
    if "--approximate" in argv:
        rest = [a for a in argv if a != "--approximate"]
        approximate(n=int(rest[rest.index("--n") + 1]) if "--n" in rest else 1_000_000)
        return 0
    return 0 if measure(argv)["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
