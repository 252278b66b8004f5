"""Exported models' registry entries on disk (`ragserve.json`), and the flags that name them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ragserve_server.models.registry import MANIFEST, ModelSpec


def exported_spec(folder: Path, name: str | None = None, kind: str | None = None) -> ModelSpec:
    """The registry entry of an exported model, read from its manifest.

    `name` renames it (the flag's `name=folder`); `kind`, when given, must match.
    """
    folder = Path(folder).resolve()
    manifest = folder / MANIFEST
    if not manifest.exists():
        raise ValueError(
            f"{folder} has no {MANIFEST}: it is not an exported model; build it with "
            f"scripts/export_cross_encoder.py or scripts/export_encoder.py --out {folder}"
        )
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest}: not valid JSON ({exc}); re-export the model") from exc
    spec = ModelSpec.from_manifest(data, folder)
    if spec.triton_model != folder.name:
        raise ValueError(
            f"{manifest}: triton_model is {spec.triton_model!r} but the folder is {folder.name!r} "
            f"(Triton names models by folder); re-export with --out .../{spec.triton_model} or rename the folder"
        )
    if kind is not None and spec.kind != kind:
        raise ValueError(f"{manifest}: model {spec.name!r} is a {spec.kind} model, not a {kind} model")
    return replace(spec, name=name) if name else spec


def write_manifest(spec: ModelSpec, folder: Path) -> None:
    """Writes `spec` as `folder`/ragserve.json, folders relative to `folder` where inside it."""
    data = spec.to_manifest()
    for key in ("tokenizer_dir", "weights_dir"):
        if data.get(key):
            path = Path(data[key])
            try:
                data[key] = str(path.resolve().relative_to(Path(folder).resolve()))
            except ValueError:
                data[key] = str(path)
    (Path(folder) / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")


def parse_named_folders(value: str, flag: str) -> dict[str, Path]:
    """`name=folder,name2=folder2` (the --cross-encoders / --embedding-models settings) -> {name: folder}."""
    result: dict[str, Path] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ValueError(f"{flag}: expected name=model_dir, got {item!r}")
        if name.strip() in result:
            raise ValueError(f"{flag}: {name.strip()!r} is given twice")
        result[name.strip()] = Path(folder.strip())
    return result
