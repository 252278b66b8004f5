"""Builds FP16 TensorRT plans for every encoder from the same ONNX files (`make engines`).

    .venv/bin/python scripts/build_engines.py [--out build/model_repository_gpu]
        [--cross-encoders name=folder,...] [--embedding-models name=folder,...]

First it checks what can be checked without a GPU: each encoder's optimization profiles
cover every length bucket the gateway sends (`tensorrt_profiles.check_coverage`) and its ONNX
file is there. Then it renders the GPU repository (`tensorrt_plan` encoders, copies of every
other model's artifacts, ready to mount into NVIDIA's Triton container) and builds, for each
encoder, `<out>/<triton model>/1/model.plan`: FP16, one optimization profile per bucket for
every token input, INT64 token inputs kept (TensorRT 10 takes INT64 I/O, so the gateway
sends the same tensors on every device). Each plan is deserialized again and its tensor
names, dtypes and profile count are checked against the registry entry.

Needs an NVIDIA GPU and the `tensorrt` package of the TensorRT version that the serving
Triton container runs (a plan only loads in the TensorRT version that built it): build
inside `nvcr.io/nvidia/tensorrt:<YY.MM>-py3` with the same YY.MM as the Triton image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ragserve_server.models.registry import (

    CROSS_ENCODER,

    DEFAULT_REPOSITORY,

    EMBEDDING,

    GENERATION,

    GPU,

    REPO_ROOT,

    TENSORRT,

    ModelSpec,

)

from ragserve_server.models.builtin import builtin_specs

from ragserve_server.models.manifest import exported_spec, parse_named_folders
from ragserve_server.models.repository import render_repository
from ragserve_server.models.tensorrt_profiles import Profile, check_coverage, profile_plan

INSTALL_HINT = (
    "pip install tensorrt-cu12 on a machine with an NVIDIA GPU (the same TensorRT version as the Triton "
    "container that will serve the plans), or build inside NVIDIA's Triton/TensorRT container "
    "(nvcr.io/nvidia/tensorrt:<YY.MM>-py3 matching nvcr.io/nvidia/tritonserver:<YY.MM>-py3)"
)
# TensorRT data type name -> Triton's, for the check of a built plan against the registry.
TRT_TO_TRITON = {"INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BOOL": "TYPE_BOOL"}


class BuildError(Exception):
    """A problem the user must fix; its message names the model, the file and the fix."""


def encoders(source: Path, cross_encoders: str, embedding_models: str) -> tuple[list[ModelSpec], dict[str, Path]]:
    """Every encoder to build (built-in and exported) and the repository folder each lives in."""
    specs, folders = [], {}
    for spec in builtin_specs(source, ["minilm"]):
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
        fix = "make models" if spec.triton_model == "minilm" else f"scripts/export_cross_encoder.py / scripts/export_encoder.py --out {folder}"
        raise BuildError(f"model {spec.name!r}: {path} is missing; build it first ({fix})")
    return path


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:  # also an OSError-wrapped missing libnvinfer
        raise BuildError(f"TensorRT is not importable ({exc}); {INSTALL_HINT}") from exc
    except OSError as exc:
        raise BuildError(f"TensorRT is installed but its libraries do not load ({exc}); {INSTALL_HINT}") from exc
    return trt


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
            f"TensorRT {trt.__version__} builds strongly typed networks only (no BuilderFlag.FP16): use TensorRT 10.x, "
            "the version of NVIDIA's Triton containers (pip install 'tensorrt-cu12<11' or nvcr.io/nvidia/tensorrt:<YY.MM>-py3)"
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


def build(args: argparse.Namespace) -> None:
    specs, folders = encoders(args.source, args.cross_encoders, args.embedding_models)
    plans = {}
    for spec in specs:  # everything that needs no GPU first, so a mistake costs no build time
        profiles = profile_plan(spec)
        try:
            check_coverage(spec, profiles)
        except ValueError as exc:
            raise BuildError(str(exc)) from exc
        plans[spec.name] = (profiles, onnx_file(spec, folders[spec.name]))
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = make_builder(trt, logger)

    out = args.out.resolve()
    render_repository(generation_models(args.source), GPU, out, source=args.source, copy=True)
    for spec in specs:
        render_repository([spec], GPU, out, source=folders[spec.name].parent, encoder_backend=TENSORRT, copy=True)
    print(f"build_engines: TensorRT {trt.__version__}; repository {out}", file=sys.stderr)
    for spec in specs:
        profiles, onnx_path = plans[spec.name]
        path = out / spec.triton_model / "1" / "model.plan"
        print(f"build_engines: {spec.name}: {onnx_path} -> {path} ({len(profiles)} profiles, FP16)", file=sys.stderr)
        plan = build_plan(trt, builder, logger, spec, onnx_path, profiles, args.workspace_gib)
        check_plan(trt, logger, spec, plan, profiles, path)
        path.write_bytes(plan)
    print(f"build_engines: done; serve {out} with NVIDIA's Triton container (README: GPUs)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
