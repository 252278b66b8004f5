"""Calibrates an embedding model for int8 / uint8 embeddings (`make models` runs it for MiniLM).

The ranges are sentence-transformers' `calibration_embeddings` ranges: the min and max, per
dimension, of the model's normalised full-size embeddings of a calibration corpus (default
bench/data/relevance.jsonl: every query and document, ~280 short English texts). The model
runs in-process with ONNX Runtime on its exported model.onnx, tokenized as the gateway does.

    python scripts/calibrate_embeddings.py --builtin minilm        # model_repository/minilm/1/calibration.json
    python scripts/calibrate_embeddings.py --model-dir model_repository/my-encoder   # into its ragserve.json

Texts outside the corpus's ranges are clipped to 0 / 255: calibrate on text like yours
(`--corpus your.txt`, one text per line) for the best int8 recall.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT / "bench" / "data" / "relevance.jsonl"


def corpus_texts(path: Path) -> list[str]:
    """Texts of a corpus: .jsonl rows with "query" and/or "documents" / "text", else one text per line."""
    texts: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            row = json.loads(line)
            texts += [row[k] for k in ("query", "text") if row.get(k)] + list(row.get("documents", ()))
        else:
            texts.append(line.strip())
    return list(dict.fromkeys(texts))  # unique, in order


def embeddings(spec, onnx_path: Path, texts: list[str], batch: int = 32) -> np.ndarray:
    """Normalised full-size embeddings, computed as the gateway computes them."""
    import onnxruntime as ort

    from ragserve_server.encoding.encoder import finish_embeddings
    from ragserve_server.encoding.tokenization import TRUNCATE_END, EncoderTokenizer

    tokenizer = EncoderTokenizer(spec.tokenizer_dir / "tokenizer.json", spec.max_input_tokens)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    rows = []
    for start in range(0, len(texts), batch):
        sequences = tokenizer.encode(texts[start : start + batch], TRUNCATE_END)
        padded = tokenizer.pad(sequences, max(len(s) for s in sequences))
        feed = {"input_ids": padded.input_ids, "attention_mask": padded.attention_mask, "token_type_ids": padded.token_type_ids}
        (pooled,) = session.run(["embedding"], {k: v for k, v in feed.items() if k in wanted})
        rows.append(finish_embeddings(pooled, dimensions=spec.dimensions, normalize=True))
    return np.concatenate(rows)


def calibration(spec, onnx_path: Path, corpus: Path) -> dict:
    from ragserve_server.models.calibration import calibration_ranges

    texts = corpus_texts(corpus)
    if len(texts) < 2:
        sys.exit(f"{corpus}: {len(texts)} texts; a calibration corpus needs many (hundreds)")
    try:
        corpus_name = str(corpus.resolve().relative_to(ROOT))
    except ValueError:
        corpus_name = str(corpus)
    return {
        **calibration_ranges(embeddings(spec, onnx_path, texts)),
        "corpus": corpus_name,
        "texts": len(texts),
        "normalize": True,
        "dimensions": spec.dimensions,
        "revision": spec.revision,
    }


def main() -> None:
    from ragserve_server.models.builtin import BUILTIN
    from ragserve_server.models.registry import CALIBRATION_FILE, DEFAULT_REPOSITORY, EMBEDDING
    from ragserve_server.models.manifest import exported_spec, write_manifest

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--builtin", help="a built-in embedding model's Triton name (minilm): writes <repository>/<name>/1/calibration.json")
    which.add_argument("--model-dir", type=Path, help="an exported embedding model's folder: writes int8_calibration into its ragserve.json")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="the model repository (with --builtin)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=".jsonl (query/documents/text) or .txt (one text per line)")
    args = parser.parse_args()

    if args.builtin:
        if args.builtin not in BUILTIN:
            sys.exit(f"--builtin {args.builtin!r}: built-in models are {', '.join(BUILTIN)}")
        spec = BUILTIN[args.builtin](args.repository)
        folder = args.repository / spec.triton_model
    else:
        folder = args.model_dir.resolve()
        spec = exported_spec(folder)
    if spec.kind != EMBEDDING:
        sys.exit(f"model {spec.name!r} is a {spec.kind} model: only embedding models are calibrated")
    onnx_path = folder / "1" / "model.onnx"
    if not onnx_path.exists():
        sys.exit(f"{onnx_path} is missing: build the model first (make models)")
    result = calibration(spec, onnx_path, args.corpus)
    if args.builtin:
        out = folder / "1" / CALIBRATION_FILE
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result) + "\n")
        tmp.replace(out)
    else:
        from dataclasses import replace

        out = folder / "ragserve.json"
        write_manifest(replace(spec, int8_calibration=result), folder)
    print(f"{spec.name}: int8 calibration from {result['texts']} texts of {result['corpus']} -> {out}")


if __name__ == "__main__":
    main()
