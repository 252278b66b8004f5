"""Triton python-backend model: runs an ONNX encoder graph with ONNX Runtime on the CPU.

Generic over the graph: it feeds the inputs and returns the outputs that config.pbtxt
declares (the graph's own names), so the same file serves the MiniLM embedder and every
exported cross-encoder. Copied into each model's version folder by the export scripts;
tests/test_rerank_unit.py checks that the copies are unchanged.

Each Triton execution gets the requests the dynamic batcher grouped; they are run as one
ONNX Runtime batch. Requests normally share a shape (the gateway pads to length buckets);
if not, they are right-padded to the longest (padding is masked, so results are unchanged).
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# The Triton 2.51 stub's pybind11 predates numpy 2 and misreads numpy 2 arrays (outputs reach
# Triton empty), so under numpy 2 tensors cross the python backend as DLPack; under numpy 1,
# whose DLPack export breaks in the stub ("used_dlpack" capsule), the numpy path stays.
NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


def _array(tensor) -> np.ndarray:
    """An input tensor's values (a view, valid during execute)."""
    return np.from_dlpack(tensor) if NUMPY_2 else tensor.as_numpy()


def _tensor(name: str, array: np.ndarray):
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array)) if NUMPY_2 else pb_utils.Tensor(name, array)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        # An execution's row count picks its ONNX Runtime session: the graph (`small_batch_onnx_file`
        # for at most `small_batch_max_rows` rows, registry.FUSED_ONNX_MAX_ROWS says why) and the
        # thread count (`few_rows_intra_op_threads` for at most `few_rows_max_rows` rows,
        # registry.FEW_ROWS_MAX_ROWS says why). Absent or "" parameters: `onnx_file` with
        # `intra_op_threads` for every execution.
        max_rows = max(int(config.get("max_batch_size", 0)), 1)
        graph_rows = int(params.get("small_batch_max_rows") or 0) if params.get("small_batch_onnx_file") else 0
        thread_rows = int(params.get("few_rows_max_rows") or 0) if params.get("few_rows_intra_op_threads") else 0
        threads = int(params.get("intra_op_threads", "2"))

        def choice(rows):
            graph = params["small_batch_onnx_file"] if rows <= graph_rows else params.get("onnx_file", "model.onnx")
            return graph, int(params["few_rows_intra_op_threads"]) if rows <= thread_rows else threads

        # choices[rows] for 1..max_rows; an execution of more rows (unbatched model) takes the last.
        self.choices = [None] + [choice(rows) for rows in range(1, max_rows + 1)]
        self.sessions = {key: _session(folder / key[0], key[1], params) for key in dict.fromkeys(self.choices[1:])}
        # An exporter may drop an input the graph never reads (token_type_ids of XLM-R): skip it.
        graph_inputs = {i.name for i in next(iter(self.sessions.values())).get_inputs()}
        self.inputs = [i["name"] for i in config["input"] if i["name"] in graph_inputs]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        arrays = {name: [_array(pb_utils.get_input_tensor_by_name(r, name)) for r in requests] for name in self.inputs}
        sizes = [a.shape[0] for a in arrays[self.inputs[0]]]
        width = max(a.shape[1] for a in arrays[self.inputs[0]])
        feed = {name: np.concatenate([_pad(a, width) for a in parts]) for name, parts in arrays.items()}
        session = self.sessions[self.choices[min(sum(sizes), len(self.choices) - 1)]]
        results = session.run(self.outputs, feed)
        responses, start = [], 0
        for size in sizes:
            tensors = [_tensor(name, value[start : start + size]) for name, value in zip(self.outputs, results)]
            start += size
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses


def _session(path, threads, params):
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    # "0": idle intra-op threads sleep instead of spinning on a core the gateway and
    # Triton share (registry.ORT_ALLOW_SPINNING says why; measured by bench/embed_bench.py).
    spinning = params.get("allow_spinning", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _pad(array, width):
    if array.shape[1] == width:
        return array
    return np.pad(array, ((0, 0), (0, width - array.shape[1])))
