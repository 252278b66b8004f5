"""Balancing cost: Embed through one gateway over 1 Triton replica vs over 2, side by side.

Three setups: 1 replica; 2 replicas of which only one has the model loaded (every call goes
to it: what the replica set's bookkeeping and picking cost); 2 serving replicas (calls spread:
on one machine each replica sees half the requests, so its batches are smaller, and the two
ONNX Runtimes compete for the same cores).

    .venv/bin/python bench/replicas_bench.py [--requests 1500] [--rounds 3] [--concurrency 16 64]

Both gateways and all Tritons run on loopback and are started first; then the setups are
measured in turn, round after round, and the median round is shown. On a 2-core machine a
second replica adds no compute (both share the same cores): the ratio shows what spreading
calls over replicas (ReplicaSet: readiness per model, round robin, a channel per replica)
costs, not what it gains on separate machines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from embed_bench import measure, sentences  # noqa: E402
from support import GatewayProcess, start_triton  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500, help="single-sentence calls per setup and level")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()
    texts = sentences(4096)
    work = Path(tempfile.mkdtemp(prefix="replicas_bench."))
    tritons = [start_triton(work / f"triton{i}", ["minilm"]) for i in range(2)]
    tritons.append(start_triton(work / "triton-empty", []))  # up, but serves no model
    gateways = {}
    try:
        gateways["1 replica"] = GatewayProcess(tritons[0].grpc_url, ["minilm"], work / "g1.log").wait_serving()
        gateways["2, 1 ready"] = GatewayProcess(
            f"{tritons[0].grpc_url},{tritons[2].grpc_url}", ["minilm"], work / "g3.log"
        ).wait_serving()
        gateways["2 replicas"] = GatewayProcess(
            ",".join(t.grpc_url for t in tritons[:2]), ["minilm"], work / "g2.log"
        ).wait_serving()
        runs: dict[tuple[str, int], list[tuple]] = {}
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                for name, gateway in gateways.items():
                    result = measure(gateway.address, texts, concurrency, args.requests)
                    runs.setdefault((name, concurrency), []).append(result)
                    print(f"round {round_ + 1} {name:<10} c{concurrency:<3} {result[0]:7.0f} sent/s", file=sys.stderr)
        print(f"\n{'setup':<12}{'conc':>6}{'sent/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'vs 1 replica':>14}")
        for concurrency in args.concurrency:
            base = None
            for name in gateways:
                rounds = sorted(runs[(name, concurrency)], key=lambda r: r[0])
                rate, p50, p99, errors = rounds[len(rounds) // 2]
                base = base or rate
                print(f"{name:<12}{concurrency:>6}{rate:>9.0f}{p50:>9.2f}{p99:>9.2f}{errors:>8}{rate / base:>13.2f}x")
        for name in ("2, 1 ready", "2 replicas"):
            rates = [statistics.median(r[0] for r in runs[(name, c)]) / statistics.median(r[0] for r in runs[("1 replica", c)]) for c in args.concurrency]
            print(f"cost of {name!r} vs 1 replica (median over levels): {1 - statistics.median(rates):+.1%}")
    finally:
        for gateway in gateways.values():
            gateway.stop()
        for triton in tritons:
            triton.stop()


if __name__ == "__main__":
    main()
