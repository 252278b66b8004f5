"""Renders Triton model repositories from the registry: one per device.

    python -m ragserve_server.models.repository --device cpu            # model_repository/*/config.pbtxt
    python -m ragserve_server.models.repository --device gpu --out build/model_repository_gpu

CPU (the embedded default) is `model_repository/` itself: only the configs are written, the
artifacts are there already (`make models`). A GPU repository is a new folder whose version
folders link (or, with `--copy`, hold copies of) what each variant needs, ready for the
bundled Triton on a GPU box or to be mounted into NVIDIA's Triton container.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from tritonclient.grpc import model_config_pb2

from ragserve_server.models import model_config
from ragserve_server.models.registry import (
    CPU,
    DEFAULT_REPOSITORY,
    DEVICES,
    ENCODER_BACKENDS,
    GENERATION,
    ONNXRUNTIME,
    TEMPLATES,
    TENSORRT,
    TORCH_CUDA,
    ModelSpec,
)
from ragserve_server.models.builtin import builtin_specs
from ragserve_server.models.tensorrt_profiles import profile_plan

# Dynamic batching on a GPU: a short wait fills bigger batches for a device that is much
# faster per row at batch 32-64 than at 1; the queue is bounded and expired work is dropped.
# No preferred batch sizes: with them Triton holds rows back to hit a listed size (40 rows
# queued: 32 sent, 8 wait), and its guide sets them only where one size is much faster, which
# a TensorRT plan with a profile per shape is not. Without them a batch takes every queued row
# up to max_batch_size.
GPU_QUEUE_DELAY_US = 200
GPU_MAX_QUEUE_SIZE = 1024
# CPU: ~64 requests of up to 64 rows already take seconds to compute on 2 cores.
CPU_MAX_QUEUE_SIZE = 256
# Requests without a deadline still leave the queue after this long.
QUEUE_TIMEOUT_US = 60_000_000
PRIORITY_LEVELS = 2


def triton_config(spec: ModelSpec, variant: str) -> model_config_pb2.ModelConfig:
    """The ModelConfig of `spec` running as `variant` (ONNXRUNTIME, TORCH_CUDA or TENSORRT)."""
    if variant not in spec.artifacts:
        raise ValueError(f"model {spec.name!r} has no {variant!r} variant; it has {', '.join(spec.variants)}")
    config = model_config_pb2.ModelConfig(name=spec.triton_model, max_batch_size=spec.max_batch)
    if variant == TENSORRT:
        config.platform = "tensorrt_plan"
    else:
        config.backend = "python"
    config.input.extend(t.to_input() for t in spec.inputs)
    config.output.extend(t.to_output() for t in spec.outputs)
    if spec.decoupled:
        config.model_transaction_policy.decoupled = True
    on_gpu = variant != ONNXRUNTIME
    group = config.instance_group.add(count=spec.cpu_instances if variant == ONNXRUNTIME else 1)
    group.kind = model_config_pb2.ModelInstanceGroup.KIND_GPU if on_gpu else model_config_pb2.ModelInstanceGroup.KIND_CPU
    if variant == TENSORRT:
        # Without this list Triton gives every instance profile 0 only (the 16-token bucket):
        # list them all and it picks, per request, the profile that covers the request's shape.
        group.profile.extend(str(i) for i in range(len(profile_plan(spec))))
    if spec.kind == GENERATION:
        # The engine batches in flight itself; Triton hands every request straight to it.
        config.dynamic_batching.SetInParent()
    else:
        batching = config.dynamic_batching
        if on_gpu:
            batching.max_queue_delay_microseconds = GPU_QUEUE_DELAY_US
        else:
            # CPU: requests of equal shape (same length bucket) are batched. A queue delay only
            # adds latency here: under load requests queue while the model runs and are batched
            # anyway (measured with bench/embed_bench.py --queue-delay-us, see README).
            batching.preferred_batch_size.append(spec.max_batch)
            batching.max_queue_delay_microseconds = 0
        # Two priority levels, the gateway's lanes: 1 interactive (default), 2 bulk; a bulk
        # job queued in Triton does not delay interactive requests.
        batching.priority_levels = PRIORITY_LEVELS
        batching.default_priority_level = 1
        # A bounded queue (full: RESOURCE_EXHAUSTED with a retry hint at the gateway), and the
        # caller's deadline as each request's timeout: expired work is dropped before compute.
        policy = batching.default_queue_policy
        policy.max_queue_size = GPU_MAX_QUEUE_SIZE if on_gpu else CPU_MAX_QUEUE_SIZE
        policy.timeout_action = model_config_pb2.ModelQueuePolicy.REJECT
        policy.default_timeout_microseconds = QUEUE_TIMEOUT_US
        policy.allow_timeout_override = True
    model_config.set_parameters(config, spec.parameters.get(variant, {}))
    if variant == TORCH_CUDA and spec.kind != GENERATION:
        config.parameters["hf_dir"].string_value = str(spec.weights_dir or spec.tokenizer_dir)
    return config


_RUNS_AS = {ONNXRUNTIME: "CPU, python backend", TORCH_CUDA: "GPU, python backend, PyTorch fp16", TENSORRT: "GPU, TensorRT plan"}


def config_header(spec: ModelSpec, variant: str) -> str:
    return (
        f"{spec.description or spec.name}.\nRuns as: {_RUNS_AS[variant]} (variant {variant!r}).\n"
        "Rendered from server/ragserve_server/models/registry.py by `make configs`: edit the registry, not this file."
    )


def write_config(spec: ModelSpec, variant: str, repository: Path) -> Path:
    path = Path(repository) / spec.triton_model / "config.pbtxt"
    model_config.write(path, triton_config(spec, variant), config_header(spec, variant))
    return path


def render_repository(
    specs: Iterable[ModelSpec],
    device: str,
    out: Path,
    *,
    source: Path = DEFAULT_REPOSITORY,
    encoder_backend: str = TENSORRT,
    copy: bool = False,
) -> dict[str, str]:
    """Writes each model's config for `device` into `out`, and (when `out` is not the source
    repository) its version folder. Returns {triton model: variant}.

    Python-backend version folders are linked to the source (or copied with `copy`, for a
    volume mounted into a container); a TensorRT plan is left for `make engines` to build.
    """
    out, source = Path(out).resolve(), Path(source).resolve()
    rendered = {}
    for spec in specs:
        variant = spec.variant_for(device, encoder_backend)
        write_config(spec, variant, out)
        rendered[spec.triton_model] = variant
        if out == source.resolve() and variant == ONNXRUNTIME:
            continue
        src_version = source / spec.triton_model / "1"
        dst_version = out / spec.triton_model / "1"
        if variant == TENSORRT:
            dst_version.mkdir(parents=True, exist_ok=True)  # model.plan: `make engines`
        elif variant == TORCH_CUDA and spec.kind != GENERATION:
            dst_version.mkdir(parents=True, exist_ok=True)
            shutil.copy2(TEMPLATES / "torch_encoder_model.py", dst_version / "model.py")
            if copy and spec.weights_dir is not None:
                # In a container the weights must be inside the volume, next to the model.
                _replace(dst_version / "hf", spec.weights_dir, copy=True)
                cfg_path = out / spec.triton_model / "config.pbtxt"
                cfg = model_config.read(cfg_path)
                model_config.set_parameters(cfg, {"hf_dir": "1/hf"})
                model_config.write(cfg_path, cfg, config_header(spec, variant))
        else:
            _replace(dst_version, src_version, copy=copy)
    return rendered


def _replace(target: Path, source: Path, *, copy: bool) -> None:
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copytree(source, target, symlinks=False, copy_function=_link_or_copy)
    else:
        target.symlink_to(source, target_is_directory=True)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard links where the file system allows (the 500 MB generation weights), else copies."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ragserve_server.models.repository", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=DEVICES, default=CPU)
    parser.add_argument("--out", type=Path, default=None, help="repository to write (default: model_repository/ for cpu)")
    parser.add_argument("--encoder-backend", choices=ENCODER_BACKENDS, default=TENSORRT,
                        help="how encoders run on a GPU: TensorRT plans (NVIDIA's container) or PyTorch in the python backend")
    parser.add_argument("--copy", action="store_true", help="copy (hard-link) artifacts instead of symlinking (for a container volume)")
    args = parser.parse_args(argv)
    out = args.out or (DEFAULT_REPOSITORY if args.device == CPU else None)
    if out is None:
        parser.error("--out is required for --device gpu")
    rendered = render_repository(builtin_specs(), args.device, out, encoder_backend=args.encoder_backend, copy=args.copy)
    for name, variant in rendered.items():
        print(f"{Path(out) / name / 'config.pbtxt'}: {variant}", file=sys.stderr)


if __name__ == "__main__":
    main()


def publish_export(spec: ModelSpec, staging: Path, out: Path) -> None:
    """Finishes an exported model built in `staging`: its registry entry (ragserve.json) and
    CPU config are written, then the folder replaces `out` (a half-exported folder never
    looks built). Shared by scripts/export_encoder.py and scripts/export_cross_encoder.py."""
    from ragserve_server.models.manifest import write_manifest

    spec.validate()
    write_manifest(spec, staging)
    model_config.write(staging / "config.pbtxt", triton_config(spec, ONNXRUNTIME), config_header(spec, ONNXRUNTIME))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
