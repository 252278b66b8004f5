"""Load test of a running ragserve stack over gRPC: Embed, Rerank and Generate users.

    make loadtest                      # headless, bounded; reports under reports/
    locust -f loadtest/locustfile.py --host 127.0.0.1:50051      # web UI

Every call goes through `LocustInterceptor`, which fires one locust request event per
call (request type "grpc", name "Service/Method", the gateway's metric labels). A
GenerateStream call is timed to its last message; its time to first token is a second
entry of request type "ttft". A service the stack does not serve (UNIMPLEMENTED, e.g. no
generation model loaded) is neither counted here nor by the gateway: its users stop.

When locust quits, a table of p50/p95/p99 and failures is printed and the exit code is 1
if any call failed or an SLO below was missed (the README's "Operating" section lists them).
"""

from __future__ import annotations

# gRPC must cooperate with gevent before any channel exists (locust runs users as greenlets).
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import atexit  # noqa: E402
import csv  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import grpc  # noqa: E402
from locust import User, between, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING  # noqa: E402
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV  # noqa: E402

from ragserve.v1 import (  # noqa: E402
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    generate_pb2,
    generate_pb2_grpc,
    rerank_pb2,
    rerank_pb2_grpc,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"

# p95 objectives in milliseconds, per locust entry (request type, name), for the bounded
# `make loadtest` load on the reference machine (2 CPU cores, no GPU). Override one with
# RAGSERVE_SLO_<TYPE>_<SERVICE>_<METHOD>_P95_MS, e.g. RAGSERVE_SLO_GRPC_EMBED_EMBED_P95_MS=300.
SLO_P95_MS = {
    ("grpc", "Embed/Embed"): 1500,
    ("grpc", "Rerank/Rerank"): 3000,
    ("ttft", "Generate/GenerateStream"): 5000,
    ("grpc", "Generate/GenerateStream"): 20000,
}

# Sentences of RAG-like passages; inputs are built from 1 to 4 of them, so lengths vary from a
# few tokens (queries) to ~70 tokens (passages: chunks sized for a 2-core CPU model server).
SENTENCES = [
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Kubernetes schedules containers onto nodes and restarts them when they fail.",
    "The mitochondrion is often described as the powerhouse of the cell.",
    "Interest rates rose sharply as central banks tried to curb inflation.",
    "A transformer encoder maps a sequence of tokens to contextual embeddings.",
    "The Amazon river carries more water than any other river on Earth.",
    "Dynamic batching groups requests that arrive close together into one model execution.",
    "Shakespeare wrote Hamlet around the year 1600.",
    "Vaccines train the immune system to recognise a pathogen without causing disease.",
    "Retrieval-augmented generation grounds a language model's answer in retrieved passages.",
    "The speed of light in vacuum is about 299,792 kilometres per second.",
    "Mount Everest sits on the border between Nepal and China.",
    "Gradient descent updates parameters in the direction that reduces the loss.",
    "The Great Barrier Reef is the largest coral reef system in the world.",
    "HTTP/2 multiplexes many streams over a single TCP connection.",
    "Marie Curie was the first person to win Nobel Prizes in two sciences.",
    "A cosine similarity of one means two vectors point in the same direction.",
    "Tokyo is the most populous metropolitan area in the world.",
    "Prometheus scrapes metrics over HTTP and stores them as time series.",
    "Bees communicate the direction of food sources with a waggle dance.",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War.",
    "Quantisation stores model weights with fewer bits to save memory and bandwidth.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower.",
]
QUERIES = [
    "when was the eiffel tower built",
    "how do plants make energy from sunlight",
    "what does kubernetes do",
    "largest river by water volume",
    "who wrote hamlet",
    "how does dynamic batching improve throughput",
    "what is retrieval augmented generation",
    "why does water boil faster in the mountains",
    "first person with two nobel prizes",
    "how fast is light",
]
QUESTIONS = [
    "What is the capital of France?",
    "Explain in one sentence what an embedding is.",
    "Give two reasons to batch requests on a GPU.",
    "Summarise: dynamic batching groups requests into one model execution.",
    "Write a haiku about servers.",
    "What is the difference between latency and throughput?",
]


def passage(rng: random.Random, max_sentences: int) -> str:
    return " ".join(rng.sample(SENTENCES, rng.randint(1, max_sentences)))


class ServiceMissing(Exception):
    """The stack answers UNIMPLEMENTED: it does not serve this service."""


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Fires one locust request event per gRPC call (locust's documented gRPC pattern)."""

    def __init__(self, environment) -> None:
        self.environment = environment

    @staticmethod
    def _name(details) -> str:
        service, _, method = details.method.lstrip("/").rpartition("/")
        return f"{service.rsplit('.', 1)[-1]}/{method}"  # "/ragserve.v1.Embed/Embed" -> "Embed/Embed"

    def _fire(self, request_type: str, name: str, started: float, length: int, exception) -> None:
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        started = time.perf_counter()
        outcome = continuation(client_call_details, request)
        try:
            length, exception = outcome.result().ByteSize(), None
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ServiceMissing(client_call_details.method) from exc
            length, exception = 0, exc
        self._fire("grpc", self._name(client_call_details), started, length, exception)
        return outcome

    def intercept_unary_stream(self, continuation, client_call_details, request):
        started = time.perf_counter()
        return self._timed_stream(continuation(client_call_details, request), self._name(client_call_details), started)

    def _timed_stream(self, call, name: str, started: float):
        length, first = 0, True
        try:
            for message in call:
                if first:  # time to first token: its own entry
                    self._fire("ttft", name, started, 0, None)
                    first = False
                length += message.ByteSize()
                yield message
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ServiceMissing(name) from exc
            self._fire("grpc", name, started, length, exc)
            return
        self._fire("grpc", name, started, length, None)


class GrpcUser(User):
    """A user with its own channel through the reporting interceptor."""

    abstract = True
    wait_time = between(0.02, 0.2)

    def on_start(self) -> None:
        self.address = self.host or os.environ.get("RAGSERVE_ADDRESS", DEFAULT_ADDRESS)
        self.rng = random.Random()
        self.channel = grpc.intercept_channel(grpc.insecure_channel(self.address), LocustInterceptor(self.environment))

    def on_stop(self) -> None:
        self.channel.close()

    def call(self, fn):
        """Runs one call; a failed call is already reported by the interceptor."""
        runner = self.environment.runner
        if runner is not None and runner.state in (STATE_STOPPING, STATE_CLEANUP, STATE_STOPPED):
            # Locust kills waiting users asynchronously: one that wakes up meanwhile would start
            # a call only to have it killed (the gateway would count a CANCELLED call locust never saw).
            raise StopUser()
        try:
            return fn()
        except ServiceMissing as missing:
            _note_missing(str(missing))
            raise StopUser() from None
        except grpc.RpcError:
            return None


_missing_noted: set[str] = set()


def _note_missing(method: str) -> None:
    if method not in _missing_noted:
        _missing_noted.add(method)
        print(f"loadtest: {method} answered UNIMPLEMENTED (not served by this stack); its users stop", flush=True)


class EmbedUser(GrpcUser):
    """A retriever's traffic: mostly queries one at a time, sometimes a batch of passages."""

    weight = 6

    def on_start(self) -> None:
        super().on_start()
        self.stub = embed_pb2_grpc.EmbedStub(self.channel)

    @task(3)
    def embed_query(self) -> None:
        query = self.rng.choice(QUERIES)
        request = embed_pb2.EmbedRequest(inputs=[query], input_type=embed_pb2.INPUT_TYPE_QUERY)
        self.call(lambda: self.stub.Embed(request, timeout=30))

    @task(1)
    def embed_passages(self) -> None:
        texts = [passage(self.rng, 4) for _ in range(self.rng.randint(2, 8))]
        request = embed_pb2.EmbedRequest(
            inputs=texts, input_type=embed_pb2.INPUT_TYPE_PASSAGE, truncate=common_pb2.TRUNCATE_END
        )
        self.call(lambda: self.stub.Embed(request, timeout=30))


class RerankUser(GrpcUser):
    """A query against 5-20 retrieved candidates of varied lengths."""

    weight = 3

    def on_start(self) -> None:
        super().on_start()
        self.stub = rerank_pb2_grpc.RerankStub(self.channel)

    @task
    def rerank(self) -> None:
        documents = [passage(self.rng, 3) for _ in range(self.rng.randint(5, 20))]
        request = rerank_pb2.RerankRequest(
            query=self.rng.choice(QUERIES), documents=documents, top_n=5, truncate=common_pb2.TRUNCATE_END
        )
        self.call(lambda: self.stub.Rerank(request, timeout=30))


class GenerateUser(GrpcUser):
    """Streamed chat answers grounded in a retrieved passage, 16-64 new tokens."""

    fixed_count = 1  # one streaming user whatever -u is: on a CPU engine a few streams saturate it

    def on_start(self) -> None:
        super().on_start()
        self.stub = generate_pb2_grpc.GenerateStub(self.channel)

    @task
    def generate_stream(self) -> None:
        context = passage(self.rng, 3)
        question = self.rng.choice(QUESTIONS)
        request = generate_pb2.GenerateRequest(
            messages=[
                generate_pb2.ChatMessage(role="system", content=f"Answer briefly. Context: {context}"),
                generate_pb2.ChatMessage(role="user", content=question),
            ],
            max_tokens=self.rng.randint(16, 64),
            temperature=0.7,
            seed=self.rng.randint(0, 2**31),
        )
        self.call(lambda: sum(1 for _ in self.stub.GenerateStream(request, timeout=60)))


def slo_p95_ms() -> dict[tuple[str, str], float]:
    slos = dict(SLO_P95_MS)
    for (kind, name) in list(slos):
        env = f"RAGSERVE_SLO_{kind}_{name.replace('/', '_')}_P95_MS".upper()
        if env in os.environ:
            slos[(kind, name)] = float(os.environ[env])
    return slos


@events.quitting.add_listener
def report(environment, **_kwargs) -> None:
    """Prints percentiles and failures, and fails the run on any failure or a missed SLO."""
    stats = environment.stats
    slos = slo_p95_ms()
    rows = sorted(stats.entries.values(), key=lambda e: (e.method, e.name))
    print(f"\n{'type':<5} {'name':<26} {'requests':>8} {'failures':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  SLO p95")
    missed = []
    for entry in rows:
        p50, p95, p99 = (entry.get_response_time_percentile(q) or 0 for q in (0.5, 0.95, 0.99))
        slo = slos.get((entry.method, entry.name))
        verdict = "" if slo is None else f"<= {slo:.0f} {'ok' if p95 <= slo else 'MISSED'}"
        if slo is not None and p95 > slo:
            missed.append(f"{entry.method} {entry.name}: p95 {p95:.0f} ms > {slo:.0f} ms")
        print(
            f"{entry.method:<5} {entry.name:<26} {entry.num_requests:>8} {entry.num_failures:>8}"
            f" {p50:>8.0f} {p95:>8.0f} {p99:>8.0f}  {verdict}"
        )
    calls = [e for e in rows if e.method == "grpc"]  # "ttft" entries time the same calls again
    failures = sum(e.num_failures for e in calls)
    print(f"total: {sum(e.num_requests for e in calls)} calls, {failures} failures")
    for line in missed:
        print(f"SLO missed: {line}")
    if failures or missed:
        environment.process_exit_code = 1
    # At exit, after locust closed (and flushed) its own CSV files.
    atexit.register(write_final_stats_csv, environment)


def write_final_stats_csv(environment) -> None:
    """Rewrites <csv prefix>_stats.csv with the final numbers: locust's CSV writer refreshes it
    once a second and not at exit, so the calls of the last second would be missing."""
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix:
        return
    stats_csv = StatsCSV(environment, PERCENTILES_TO_REPORT)
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(stats_csv.requests_csv_columns)
        stats_csv._requests_data_rows(writer)
