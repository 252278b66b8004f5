"""Triton python-backend model: runs the MiniLM ONNX graph with ONNX Runtime on the CPU.

Each Triton execution gets the requests the dynamic batcher grouped; they are run as one
ONNX Runtime batch. Requests normally share a shape (the gateway pads to length buckets);
if not, they are right-padded to the longest (padding is masked, so results are unchanged).
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        onnx_path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "2"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        ids = [pb_utils.get_input_tensor_by_name(r, "input_ids").as_numpy() for r in requests]
        masks = [pb_utils.get_input_tensor_by_name(r, "attention_mask").as_numpy() for r in requests]
        width = max(a.shape[1] for a in ids)
        batch_ids = np.concatenate([_pad(a, width) for a in ids])
        batch_mask = np.concatenate([_pad(a, width) for a in masks])
        (embeddings,) = self.session.run(None, {"input_ids": batch_ids, "attention_mask": batch_mask})
        responses, start = [], 0
        for a in ids:
            rows = embeddings[start : start + a.shape[0]]
            start += a.shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("embedding", rows)]))
        return responses


def _pad(array, width):
    if array.shape[1] == width:
        return array
    return np.pad(array, ((0, 0), (0, width - array.shape[1])))
