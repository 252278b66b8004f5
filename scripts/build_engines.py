"""Builds FP16 TensorRT plans for every encoder from the same ONNX files (`make engines`).

    .venv/bin/python scripts/build_engines.py [--out build/model_repository_gpu]
        [--cross-encoders name=folder,...] [--embedding-models name=folder,...]

First it checks what can be checked without a GPU: each encoder's optimization profiles
cover every length bucket the gateway sends and stay within the rows x tokens bound
(`tensorrt_profiles.check_coverage`), and its ONNX file is there. Then TensorRT: it must be
the version of the Triton that serves the plans (`gpu_versions.TRITON`: Triton 24.10 runs
TensorRT 10.5.0; a plan loads only in the TensorRT that built it), else it stops naming both.
For each encoder it builds a plan (FP16, one optimization profile per bucket for every token
input, INT64 token inputs kept: TensorRT 10 takes INT64 I/O, so the gateway sends the same
tensors on every device), deserializes it again and checks its tensor names, dtypes and
profile count against the registry entry, then runs it on reference texts in every bucket
and compares its outputs with ONNX Runtime's on the same ONNX file (min cosine >= 0.999).
Only when every plan passed is the GPU repository written (configs, copies of every other
model's artifacts, the plans, engines.json with the versions), ready to mount into the
Triton image of deploy/kubernetes/overlays/gpu/: a failed build leaves no config without
its plan.

Needs an NVIDIA GPU, `tensorrt-cu12==10.5.0` in .venv (`.venv/bin/pip install
'tensorrt-cu12==10.5.0'`: the pip wheel carries its libraries, no container needed) and
torch with CUDA in .venv (PyPI's Linux torch wheel is the CUDA one) for the numerical check.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ragserve_server.models.builtin import builtin_specs
from ragserve_server.models.buckets import bucket_length
from ragserve_server.models.gpu_versions import TRITON, check_tensorrt_version, compute_capability_note, tensorrt_install_hint
from ragserve_server.models.manifest import exported_spec, parse_named_folders
from ragserve_server.models.registry import CROSS_ENCODER, DEFAULT_REPOSITORY, EMBEDDING, GENERATION, GPU, REPO_ROOT, TENSORRT, ModelSpec
from ragserve_server.models.repository import render_repository
from ragserve_server.models.tensorrt_profiles import Profile, check_coverage, profile_plan

INSTALL_HINT = tensorrt_install_hint()
# TensorRT data type name -> Triton's, for the check of a built plan against the registry.
TRT_TO_TRITON = {"INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BOOL": "TYPE_BOOL"}
# A plan's outputs against ONNX Runtime's (fp32) on the reference texts: FP16 kernels keep
# sentence embeddings well above this; a wrong plan (a broken fusion, an overflow) falls far below.
MIN_COSINE = 0.999
# Texts of every length up to a 512-token model's limit, so that every bucket's profile runs.
_SENTENCE = "Retrieval-augmented generation looks up passages that answer a question before writing the answer."
REFERENCE_TEXTS = (
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "A short one.",
    "Tokenizers split text into word pieces, and the gateway pads them to length buckets of 16, 32 or 64 tokens.",
    "How do I reset my password if I no longer have access to the e-mail address on my account?",
    " ".join([_SENTENCE] * 3),
    " ".join([_SENTENCE] * 6),
    " ".join([_SENTENCE] * 12),
    " ".join([_SENTENCE] * 24),
    " ".join([_SENTENCE] * 48),
)
# A plan runner: (feeds by input name, profile index) -> outputs by name.
PlanRunner = Callable[[Mapping[str, np.ndarray], int], Mapping[str, np.ndarray]]
Reference = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


class BuildError(Exception):
    """A problem the user must fix; its message names the model, the file and the fix."""


def encoders(source: Path, cross_encoders: str, embedding_models: str) -> tuple[list[ModelSpec], dict[str, Path]]:
    """Every encoder to build (built-in and exported) and the repository folder each lives in."""
    specs, folders = [], {}
    for spec in builtin_specs(source, ["minilm", "minilm_tokens"]):
        specs.append(spec)
        folders[spec.name] = Path(source) / spec.triton_model
    for flag, value, kind in (("--cross-encoders", cross_encoders, CROSS_ENCODER), ("--embedding-models", embedding_models, EMBEDDING)):
        for name, folder in parse_named_folders(value, flag).items():
            try:
                spec = exported_spec(folder, name=name, kind=kind)
            except ValueError as exc:
                raise BuildError(str(exc)) from exc
            specs.append(spec)
            folders[spec.name] = Path(folder).resolve()
    return specs, folders


def generation_models(source: Path) -> list[ModelSpec]:
    """The built generation models: copied into the GPU repository too, so one volume serves everything."""
    specs = []
    for spec in builtin_specs(source):
        if spec.kind != GENERATION:
            continue
        if spec.missing_artifacts(source):
            print(f"build_engines: {spec.name} is not built in {source}; the GPU repository leaves it out", file=sys.stderr)
        else:
            specs.append(spec)
    return specs


def onnx_file(spec: ModelSpec, folder: Path) -> Path:
    path = folder / "1" / "model.onnx"
    if not path.exists():
        fix = "make models" if spec.triton_model in ("minilm", "minilm_tokens") else f"scripts/export_cross_encoder.py / scripts/export_encoder.py --out {folder}"
        raise BuildError(f"model {spec.name!r}: {path} is missing; build it first ({fix})")
    return path


def import_tensorrt():
    """The `tensorrt` module, if it is the serving Triton's TensorRT (else BuildError naming both)."""
    try:
        import tensorrt as trt
    except ImportError as exc:  # also an OSError-wrapped missing libnvinfer
        raise BuildError(f"TensorRT is not importable ({exc}); {INSTALL_HINT}") from exc
    except OSError as exc:
        raise BuildError(f"TensorRT is installed but its libraries do not load ({exc}); {INSTALL_HINT}") from exc
    check_version(trt.__version__)
    return trt


def check_version(installed: str) -> None:
    try:
        check_tensorrt_version(installed)
    except ValueError as exc:
        raise BuildError(str(exc)) from exc


def make_builder(trt, logger):
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # TensorRT raises a bare TypeError/RuntimeError when CUDA cannot start
        builder, cause = None, exc
    else:
        cause = None
    if builder is None:
        raise BuildError(
            f"TensorRT cannot start a builder ({cause or 'no CUDA device'}): building a plan needs an NVIDIA GPU with its "
            "driver (check `nvidia-smi`); run `make engines` on the GPU machine or inside NVIDIA's container with --gpus all"
        )
    return builder


def build_plan(trt, builder, logger, spec: ModelSpec, onnx_path: Path, profiles: list[Profile], workspace_gib: float) -> bytes:
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(
            f"model {spec.name!r}: TensorRT cannot parse {onnx_path}:\n  {errors}\n"
            "re-export the ONNX file (make models / scripts/export_cross_encoder.py) with an opset this TensorRT supports"
        )
    graph_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    token_inputs = [t.name for t in spec.inputs if t.name in graph_inputs]
    unexpected = sorted(set(graph_inputs) - {t.name for t in spec.inputs})
    if unexpected or "input_ids" not in token_inputs:
        raise BuildError(
            f"model {spec.name!r}: {onnx_path} takes inputs {graph_inputs}, the registry's entry sends "
            f"{[t.name for t in spec.inputs]}; re-export the model or fix its entry"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        raise BuildError(
            f"TensorRT {trt.__version__} builds strongly typed networks only (no BuilderFlag.FP16); {INSTALL_HINT}"
        )
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name in token_inputs:
            optimization.set_shape(name, profile.min, profile.opt, profile.max)
        config.add_optimization_profile(optimization)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"model {spec.name!r}: TensorRT could not build a plan from {onnx_path}; see its log above")
    return bytes(plan)


def check_plan(trt, logger, spec: ModelSpec, plan: bytes, profiles: list[Profile], path: Path) -> None:
    """The built plan's I/O tensors and profiles against the registry entry (what the gateway sends)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise BuildError(f"model {spec.name!r}: {path} does not deserialize; rebuild it")
    tensors = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        tensors[name] = (mode, TRT_TO_TRITON.get(engine.get_tensor_dtype(name).name, engine.get_tensor_dtype(name).name))
    problems = []
    for mode, wanted in (("input", spec.inputs), ("output", spec.outputs)):
        for tensor in wanted:
            actual = tensors.get(tensor.name)
            if actual is None:
                if mode == "output" or not tensor.optional:
                    problems.append(f"{mode} {tensor.name!r} is missing from the plan")
            elif actual != (mode, tensor.dtype):
                problems.append(f"{tensor.name!r} is a {actual[1]} {actual[0]} in the plan, the registry says {tensor.dtype} {mode}")
    if engine.num_optimization_profiles != len(profiles):
        problems.append(f"the plan has {engine.num_optimization_profiles} optimization profiles, the config lists {len(profiles)}")
    if problems:
        raise BuildError(f"model {spec.name!r}: {path} disagrees with the registry:\n  " + "\n  ".join(problems))


# --- the numerical check: every plan against ONNX Runtime on the same ONNX file -------------


def reference_batches(spec: ModelSpec, texts: tuple[str, ...] = REFERENCE_TEXTS) -> list[dict[str, np.ndarray]]:
    """The reference texts tokenized as the gateway sends them: truncated to the model's limit,
    padded to their length bucket, one batch per bucket, plus one batch of `max_batch` rows at
    the shortest bucket (the batch dimension's far end)."""
    from ragserve_server.encoding.tokenization import TRUNCATE_END, EncoderTokenizer

    tokenizer = EncoderTokenizer(Path(spec.tokenizer_dir) / "tokenizer.json", spec.max_input_tokens)
    by_width: dict[int, list[list[int]]] = {}
    for ids in tokenizer.encode(list(texts), TRUNCATE_END):
        by_width.setdefault(bucket_length(len(ids), spec.max_input_tokens), []).append(ids)
    shortest = min(by_width)
    groups = [by_width[w] for w in sorted(by_width)]
    groups.append([by_width[shortest][i % len(by_width[shortest])] for i in range(spec.max_batch)])
    names = [t.name for t in spec.inputs]
    batches = []
    for rows in groups:
        for start in range(0, len(rows), spec.max_batch):
            chunk = rows[start:start + spec.max_batch]
            width = bucket_length(max(len(r) for r in chunk), spec.max_input_tokens)
            padded = tokenizer.pad(chunk, width)
            tensors = {"input_ids": padded.input_ids, "attention_mask": padded.attention_mask, "token_type_ids": padded.token_type_ids}
            batches.append({n: tensors[n] for n in names if n in tensors})
    return batches


def cosines(plan: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-row cosine of two outputs [rows, ...]; one value for scalar-per-row outputs (scores),
    whose rows are compared as one vector. Two zero rows agree (1.0)."""
    a = np.asarray(plan, dtype=np.float64).reshape(len(plan), -1)
    b = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    if a.shape != b.shape:
        raise BuildError(f"the plan's output has shape {a.shape}, the reference's {b.shape}")
    if a.shape[1] == 1:
        a, b = a.T, b.T
    dot = (a * b).sum(1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)
    return np.where(np.isfinite(cos), cos, -1.0)


def check_numerics(spec: ModelSpec, run_plan: PlanRunner, reference: Reference, profiles: list[Profile],
                   batches: list[dict[str, np.ndarray]], min_cosine: float = MIN_COSINE) -> float:
    """Runs every batch through the plan (on the profile Triton would pick: the first that
    covers its shape) and the reference; returns the min cosine over every output, or raises
    BuildError naming the model, the output, the batch's shape and the cosine."""
    outputs = [t.name for t in spec.outputs]
    plan_rows: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    ref_rows: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    worst = 1.0
    for feeds in batches:
        shape = tuple(feeds["input_ids"].shape)
        index = next((i for i, p in enumerate(profiles) if p.covers(shape)), None)
        if index is None:
            raise BuildError(f"model {spec.name!r}: no optimization profile covers the reference batch {shape}")
        got, want = run_plan(feeds, index), reference(feeds)
        for name in outputs:
            if name not in got or name not in want:
                raise BuildError(f"model {spec.name!r}: output {name!r} missing from the {'plan' if name not in got else 'reference'}")
            plan_rows[name].append(np.asarray(got[name]))
            ref_rows[name].append(np.asarray(want[name]))
            if np.asarray(want[name]).reshape(shape[0], -1).shape[1] > 1:  # vectors: per row, per batch
                low = float(cosines(got[name], want[name]).min())
                worst = min(worst, low)
                if low < min_cosine:
                    raise BuildError(
                        f"model {spec.name!r}: the plan's {name!r} differs from ONNX Runtime's on a batch of shape {shape} "
                        f"(min cosine {low:.6f} < {min_cosine}); the plan is wrong, do not serve it (FP16 overflow or a "
                        "broken fusion: report the model and its ONNX opset)"
                    )
    for name in outputs:  # scalar outputs (scores): all rows of all batches as one vector
        if ref_rows[name][0].reshape(len(ref_rows[name][0]), -1).shape[1] != 1:
            continue  # vectors (per-token ones of several widths too): checked per batch above
        plan_all, ref_all = np.concatenate(plan_rows[name]), np.concatenate(ref_rows[name])
        if ref_all.reshape(len(ref_all), -1).shape[1] == 1:
            low = float(cosines(plan_all, ref_all).min())
            worst = min(worst, low)
            if low < min_cosine:
                raise BuildError(
                    f"model {spec.name!r}: the plan's {name!r} scores differ from ONNX Runtime's over the reference "
                    f"texts (cosine {low:.6f} < {min_cosine}); the plan is wrong, do not serve it"
                )
    return worst


def onnx_reference(onnx_path: Path) -> Reference:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    takes = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in takes})))

    return run


def tensorrt_runner(trt, logger, plan: bytes) -> PlanRunner:
    """Runs a plan on GPU 0 with PyTorch's CUDA memory (the pip TensorRT has no allocator API)."""
    try:
        import torch
    except ImportError as exc:
        raise BuildError(f"the numerical check needs torch with CUDA in .venv ({exc})") from exc
    if not torch.cuda.is_available():
        raise BuildError(
            f"the numerical check runs the plan through PyTorch's CUDA memory, and torch {torch.__version__} in .venv sees no "
            "CUDA device: install PyPI's CUDA build of torch there (the Linux default)"
        )
    dtypes = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32, "BOOL": torch.bool}
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]

    def run(feeds: Mapping[str, np.ndarray], profile: int) -> dict[str, np.ndarray]:
        context.set_optimization_profile_async(profile, stream.cuda_stream)
        keep, outputs = [], {}
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
                keep.append(tensor)
        for name in names:
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtypes[engine.get_tensor_dtype(name).name], device="cuda")
                context.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
        torch.cuda.synchronize()  # the copies above ran on the default stream, the plan runs on `stream`
        if not context.execute_async_v3(stream.cuda_stream):
            raise BuildError("TensorRT could not run the plan on a reference batch; see its log above")
        stream.synchronize()
        return {name: out.float().cpu().numpy() for name, out in outputs.items()}

    return run


def gpu_capability() -> tuple[int, int] | None:
    try:
        import torch

        return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None
    except Exception:  # only for a note; the numerical check says what is missing
        return None


# --- the build -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "model_repository_gpu", help="GPU repository to write")
    parser.add_argument("--source", type=Path, default=DEFAULT_REPOSITORY, help="repository holding the built-in models' ONNX files")
    parser.add_argument("--cross-encoders", default="", help="exported cross-encoders to build too: name=folder,...")
    parser.add_argument("--embedding-models", default="", help="exported embedding models to build too: name=folder,...")
    parser.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace")
    args = parser.parse_args(argv)
    try:
        build(args)
    except BuildError as exc:
        print(f"build_engines: {exc}", file=sys.stderr)
        return 1
    return 0


def build(args: argparse.Namespace, *, tensorrt=None, runner: Callable[..., PlanRunner] | None = None,
          reference: Callable[[Path], Reference] = onnx_reference) -> dict[str, float]:
    """Checks, builds, verifies, then writes the repository; returns {model: min cosine}.
    `tensorrt` and `runner` stand in for the tensorrt module and the GPU plan runner in tests."""
    specs, folders = encoders(args.source, args.cross_encoders, args.embedding_models)
    plans = {}
    for spec in specs:  # everything that needs no GPU first, so a mistake costs no build time
        profiles = profile_plan(spec)
        try:
            check_coverage(spec, profiles)
        except ValueError as exc:
            raise BuildError(str(exc)) from exc
        plans[spec.name] = (profiles, onnx_file(spec, folders[spec.name]))
    if tensorrt is None:
        trt = import_tensorrt()
    else:
        trt = tensorrt
        check_version(trt.__version__)
    runner = runner or tensorrt_runner
    logger = trt.Logger(trt.Logger.WARNING)
    builder = make_builder(trt, logger)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"build_engines: TensorRT {trt.__version__} (Triton {TRITON.release}); repository {out}", file=sys.stderr)
    agreement = {}
    with tempfile.TemporaryDirectory(prefix=".plans-", dir=out.parent) as staging:
        for spec in specs:
            profiles, onnx_path = plans[spec.name]
            path = out / spec.triton_model / "1" / "model.plan"
            print(f"build_engines: {spec.name}: {onnx_path} -> {path} ({len(profiles)} profiles, FP16)", file=sys.stderr)
            plan = build_plan(trt, builder, logger, spec, onnx_path, profiles, args.workspace_gib)
            check_plan(trt, logger, spec, plan, profiles, path)
            worst = check_numerics(spec, runner(trt, logger, plan), reference(onnx_path), profiles, reference_batches(spec))
            print(f"build_engines: {spec.name}: min cosine {worst:.6f} against ONNX Runtime", file=sys.stderr)
            agreement[spec.name] = worst
            (Path(staging) / f"{spec.triton_model}.plan").write_bytes(plan)
        # Every plan passed: only now the configs, the other models' artifacts and the plans.
        render_repository(generation_models(args.source), GPU, out, source=args.source, copy=True)
        for spec in specs:
            render_repository([spec], GPU, out, source=folders[spec.name].parent, encoder_backend=TENSORRT, copy=True)
            shutil.move(str(Path(staging) / f"{spec.triton_model}.plan"), out / spec.triton_model / "1" / "model.plan")
    capability = gpu_capability()
    (out / "engines.json").write_text(json.dumps({
        "triton_release": TRITON.release, "triton": TRITON.triton, "tensorrt": trt.__version__,
        "compute_capability": ".".join(map(str, capability)) if capability else "unknown",
        "min_cosine": agreement,
    }, indent=2) + "\n")
    note = compute_capability_note(capability) if capability else ""
    if note:
        print(f"build_engines: note: {note}", file=sys.stderr)
    print(f"build_engines: done; serve {out} with {TRITON.triton_image} plus the generation engine's packages "
          "(deploy/kubernetes/overlays/gpu/triton-gpu.Dockerfile; README: GPUs)", file=sys.stderr)
    return agreement


if __name__ == "__main__":
    sys.exit(main())
