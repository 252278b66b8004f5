"""Rerank benchmark: quality on a hand-labelled relevance set and speed at 1000 documents per
call, end to end through the gateway, printed as one table with a row per reranker.

    quality  MRR@10 and nDCG@10 of each reranker (--models; default: the MiniLM bi-encoder and
             MiniLM MaxSim) on bench/data/relevance.jsonl, next to BM25 over the same candidates
    speed    per reranker, one Rerank call of 1000 short documents next to one Embed call of
             the same 1000 documents (same run, interleaved, median of --repeats): the
             bi-encoder default should cost at most 1.3x the Embed call
    LLM      MRR@10, nDCG@10 and documents/s of the LLM rerankers (--llm-models: SmolLM2
             pointwise and FIRST-style listwise through the engine's prefill-only scoring)
             on the same set, one call per query, one call at a time

Starts its own Triton and gateway on free loopback ports (stopped at the end) unless
--address points at a running gateway.

    .venv/bin/python bench/rerank_bench.py [--address HOST:PORT] [--models A,B] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import ragserve  # noqa: E402
from support import GatewayProcess, start_triton  # noqa: E402

DATA = ROOT / "bench" / "data" / "relevance.jsonl"
ANSWER = 2  # label of a document that answers the query (1: on topic, 0: not relevant)


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- metrics ---------------------------------------------------------------------------------


def mrr_at_10(labels_in_rank_order: list[int]) -> float:
    """Reciprocal rank of the first answer in the top 10 (0 if none)."""
    for rank, label in enumerate(labels_in_rank_order[:10], start=1):
        if label >= ANSWER:
            return 1.0 / rank
    return 0.0


def ndcg_at_10(labels_in_rank_order: list[int]) -> float:
    """Graded nDCG@10 with gain 2^label - 1."""

    def dcg(labels: list[int]) -> float:
        return sum((2**label - 1) / math.log2(rank + 1) for rank, label in enumerate(labels[:10], start=1))

    ideal = dcg(sorted(labels_in_rank_order, reverse=True))
    return dcg(labels_in_rank_order) / ideal if ideal else 0.0


# --- BM25 baseline -----------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 (k1 1.2, b 0.75); document frequencies from every candidate in the set."""

    def __init__(self, corpus: list[str], k1: float = 1.2, b: float = 0.75) -> None:
        tokenized = [words(d) for d in corpus]
        self.k1, self.b = k1, b
        self.avgdl = sum(map(len, tokenized)) / len(tokenized)
        df = Counter(w for doc in tokenized for w in set(doc))
        n = len(tokenized)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}

    def score(self, query: str, document: str) -> float:
        terms = Counter(words(document))
        length = sum(terms.values())
        total = 0.0
        for w in set(words(query)):
            tf = terms.get(w, 0)
            if tf:
                total += self.idf.get(w, 0.0) * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * length / self.avgdl))
        return total


def ranked_labels(scores: list[float], labels: list[int]) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep file order
    return [labels[i] for i in order]


# --- the measurements ----------------------------------------------------------------------------


def quality(client: ragserve.Client, model: str | None, sets: list[dict]) -> tuple[str, dict[str, float]]:
    bm25 = BM25([d for s in sets for d in s["documents"]])
    rows = {"model_mrr": [], "model_ndcg": [], "bm25_mrr": [], "bm25_ndcg": []}
    name = ""
    for s in sets:
        result = client.rerank(s["query"], s["documents"], model=model)
        name = result.model
        model_order = [s["labels"][r.index] for r in result.results]
        bm25_order = ranked_labels([bm25.score(s["query"], d) for d in s["documents"]], s["labels"])
        rows["model_mrr"].append(mrr_at_10(model_order))
        rows["model_ndcg"].append(ndcg_at_10(model_order))
        rows["bm25_mrr"].append(mrr_at_10(bm25_order))
        rows["bm25_ndcg"].append(ndcg_at_10(bm25_order))
    return name, {k: statistics.fmean(v) for k, v in rows.items()}


def short_documents(sets: list[dict], n: int) -> list[str]:
    """n distinct short documents (~10-30 tokens) drawn from the relevance set."""
    pool = [d for s in sets for d in s["documents"]]
    return [f"{pool[i % len(pool)]} ({i})" for i in range(n)]


def speed(client: ragserve.Client, model: str | None, documents: list[str], repeats: int) -> tuple[float, float]:
    """Median seconds of one Rerank call and one Embed call over the same documents, interleaved."""
    query = "which document explains how the immune system learns from vaccines?"
    client.rerank(query, documents, model=model)  # warm-up: buckets, thread pools, Triton
    client.embed(documents)
    rerank_times, embed_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        client.rerank(query, documents, model=model)
        rerank_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.embed(documents)
        embed_times.append(time.perf_counter() - start)
    return statistics.median(rerank_times), statistics.median(embed_times)


def llm_quality(client: ragserve.Client, models: list[str], sets: list[dict]) -> list[tuple[str, ...]]:
    """Rows (model, MRR@10, nDCG@10, documents/s, seconds) of each LLM reranker, one call per query."""
    rows = []
    for model in models:
        client.rerank(sets[0]["query"], sets[0]["documents"], model=model)  # warm-up
        mrr, ndcg, seconds = [], [], 0.0
        for s in sets:
            start = time.perf_counter()
            result = client.rerank(s["query"], s["documents"], model=model)
            seconds += time.perf_counter() - start
            order = [s["labels"][r.index] for r in result.results]
            mrr.append(mrr_at_10(order))
            ndcg.append(ndcg_at_10(order))
        n_docs = sum(len(s["documents"]) for s in sets)
        rows.append((model, f"{statistics.fmean(mrr):.3f}", f"{statistics.fmean(ndcg):.3f}", f"{n_docs / seconds:.1f}", f"{seconds:.1f}"))
    return rows


def print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def run(address: str, args: argparse.Namespace) -> None:
    sets = load(args.data)
    models = [m.strip() for m in args.models.split(",")]
    rows = []
    with ragserve.Client(address, timeout=600) as client:
        documents = short_documents(sets, args.documents)
        for model in models:
            name, q = quality(client, model or None, sets)
            rerank_s, embed_s = speed(client, model or None, documents, args.repeats)
            rows.append((name, q, rerank_s, embed_s))
        llm_rows = llm_quality(client, args.llm_models, sets) if args.llm_models else []
    n_docs = sum(len(s["documents"]) for s in sets)
    embed_s = statistics.median(r[3] for r in rows)
    table = [("reranker", "MRR@10", "nDCG@10", "documents/s", "Rerank / Embed time")]
    table.append(("BM25 (same candidates)", f"{rows[0][1]['bm25_mrr']:.3f}", f"{rows[0][1]['bm25_ndcg']:.3f}", "", ""))
    for name, q, rerank_s, model_embed_s in rows:
        ratio = rerank_s / model_embed_s
        table.append((name, f"{q['model_mrr']:.3f}", f"{q['model_ndcg']:.3f}", f"{args.documents / rerank_s:.0f}", f"{ratio:.2f}x"))
    table.append(("Embed of the same documents", "", "", f"{args.documents / embed_s:.0f}", "bi-encoder goal <= 1.30x"))
    print(f"\nrerank benchmark: {len(sets)} queries, {n_docs} labelled candidates; "
          f"speed = median of {args.repeats} calls of {args.documents} short documents, end to end")
    print_table(table)
    if llm_rows:
        bm25 = rows[0][1]
        print(f"\nLLM rerankers on the same {len(sets)} queries ({n_docs} candidates), one call per query, "
              f"one call at a time, end to end (BM25: MRR@10 {bm25['bm25_mrr']:.3f}, nDCG@10 {bm25['bm25_ndcg']:.3f})")
        print_table([("model", "MRR@10", "nDCG@10", "documents/s", "seconds"), *llm_rows])


# The encoder rerankers measured by default (MaxSim runs on MiniLM's per-token twin, minilm_tokens).
MODELS = ["all-minilm-l6-v2-bi-encoder", "all-minilm-l6-v2-maxsim"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="a running gateway (default: start Triton and a gateway here)")
    parser.add_argument("--models", default=",".join(MODELS), help="rerankers to measure, comma-separated (\"\": the server's default)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--documents", type=int, default=1000, help="documents per call for the speed rows")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--llm-models", type=lambda v: [m for m in v.split(",") if m], default="smollm2-pointwise,smollm2-listwise",
                        help="LLM rerankers to measure too (comma-separated; empty: none, and SmolLM2 is not loaded)")
    args = parser.parse_args()
    if args.address:
        run(args.address, args)
        return
    with tempfile.TemporaryDirectory(prefix="rerank_bench_") as work:
        print("starting Triton and the gateway...", file=sys.stderr)
        triton = start_triton(Path(work), ["minilm", "minilm_tokens"] + (["smollm2"] if args.llm_models else []))
        gateway = None
        try:
            gateway = GatewayProcess(triton.grpc_url, triton.models, Path(work) / "gateway.log").wait_serving(timeout=180)
            run(gateway.address, args)
        finally:
            if gateway is not None:
                gateway.stop()
            triton.stop()


if __name__ == "__main__":
    main()
