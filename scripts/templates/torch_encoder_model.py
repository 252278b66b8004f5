"""Triton python-backend model: runs an encoder with PyTorch, on CUDA for a GPU instance.

The GPU variant (`torch_cuda`) of every encoder for the bundled Triton on a GPU box, which
has no TensorRT backend. It takes the same token tensors as the CPU model (ort_model.py) and
the TensorRT plan, so the gateway sends the same request on every device. Rendered into a
model's version folder by `ragserve_server.models.repository`; its config.pbtxt parameters:

    hf_dir  the Hugging Face folder (absolute, or relative to the model's folder)
    head    mean_pool: AutoModel + mean pooling over the attention mask, unnormalised
            (the gateway normalises) -> output `embedding` [n, dim]
            embedding: AutoModel + the registry's `pooling` (mean, cls, max, last_token,
            mean_sqrt_len_tokens; over the attention mask, either padding side) and, with
            `normalize` 1, L2 normalisation -> output `embedding` [n, dim]: the ONNX graph
            scripts/export_encoder.py writes, in PyTorch
            logits: AutoModelForSequenceClassification -> output `logits` [n, labels]
            token_embeddings: AutoModel's last hidden state through the projections in
            hf_dir/token_projections.safetensors (if any), L2-normalised per token -> output
            `token_embeddings` [n, tokens, dim]: scripts/export_multivector.py's graph
            splade: AutoModelForMaskedLM -> max over real tokens of log(1 + ReLU(logits)) ->
            output `sparse_embedding` [n, vocabulary]: scripts/export_sparse.py's graph
    dtype   float16 (default) or float32 on a GPU; a CPU instance always runs float32

A GPU instance runs on cuda:<model_instance_device_id>; it fails to load, with a clear
message, where PyTorch sees no CUDA device. Outputs are float32.

Each execution runs the requests the dynamic batcher grouped as one batch; requests of a
different width (normally all share the gateway's length bucket) are right-padded to the
widest, which the attention mask makes harmless.

Tensors cross the python backend as DLPack, not numpy: no copy into numpy arrays, and no
reliance on the stub's numpy support. The Triton 2.51 stub's pybind11 predates numpy 2 and
misreads its arrays' item size: under numpy 2 (every current CUDA image has it) an output made
from a numpy array reaches Triton empty. DLPack tensors carry their own dtype and shape.
"""

import inspect
import json
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from torch.nn.functional import pad
from torch.utils.dlpack import from_dlpack, to_dlpack

HEADS = ("mean_pool", "embedding", "logits", "token_embeddings", "splade")
PROJECTIONS_FILE = "token_projections.safetensors"  # scripts/export_multivector.py writes it
POOLINGS = ("mean", "cls", "max", "last_token", "mean_sqrt_len_tokens")


def pool(hidden, attention_mask, pooling):
    """A copy of scripts/export_encoder.py `pool` (this file runs alone in Triton)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if pooling == "mean_sqrt_len_tokens":
        return (hidden * mask).sum(1) / torch.sqrt(mask.sum(1).clamp(min=1e-9))
    if pooling == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)
    if pooling == "cls":  # the first real token
        index = attention_mask.shape[1] - (attention_mask * (attention_mask.shape[1] - positions)).max(1).values
    else:  # last_token: the last real token
        index = (attention_mask * positions).max(1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def dtype_argument(dtype: torch.dtype) -> dict:
    """`from_pretrained`'s dtype keyword: `dtype` since transformers 4.56, `torch_dtype` before
    (older versions pass an unknown `dtype` on to the model's config, and load fp32)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        name = config.get("name", args.get("model_name", "?"))
        self.head = params.get("head", "mean_pool")
        if self.head not in HEADS:
            raise pb_utils.TritonModelException(f"model {name!r}: parameter head={self.head!r}; use one of {', '.join(HEADS)}")
        self.pooling = "mean" if self.head == "mean_pool" else params.get("pooling", "mean")
        if self.pooling not in POOLINGS:
            raise pb_utils.TritonModelException(f"model {name!r}: parameter pooling={self.pooling!r}; use one of {', '.join(POOLINGS)}")
        self.normalize = self.head == "embedding" and params.get("normalize", "0") == "1"
        dtype_name = params.get("dtype", "float16")
        if dtype_name not in DTYPES:
            raise pb_utils.TritonModelException(f"model {name!r}: parameter dtype={dtype_name!r}; use one of {', '.join(DTYPES)}")
        hf_dir = Path(params.get("hf_dir", "1/hf"))
        if not hf_dir.is_absolute():
            hf_dir = Path(args["model_repository"]) / hf_dir
        if not (hf_dir / "config.json").exists():
            raise pb_utils.TritonModelException(
                f"model {name!r}: parameter hf_dir={params.get('hf_dir')!r} -> {hf_dir} has no config.json; "
                "point hf_dir at the model's Hugging Face folder (re-render the repository)"
            )

        if args.get("model_instance_kind") == "GPU":
            if not torch.cuda.is_available():
                raise pb_utils.TritonModelException(
                    f"model {name!r}: its instance group is KIND_GPU but PyTorch sees no CUDA device "
                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run on a machine with an NVIDIA GPU "
                    "and a CUDA build of PyTorch, or render the CPU repository (--device cpu)"
                )
            self.device = torch.device(f"cuda:{int(args.get('model_instance_device_id', '0'))}")
            dtype = DTYPES[dtype_name]
        else:
            self.device = torch.device("cpu")
            dtype = torch.float32  # half precision on a CPU is slow and not what any reference uses

        from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

        loader = {"logits": AutoModelForSequenceClassification, "splade": AutoModelForMaskedLM}.get(self.head, AutoModel)
        self.model = loader.from_pretrained(str(hf_dir), **dtype_argument(dtype)).to(self.device).eval()
        # Per-token projections ({i}.weight / {i}.bias, applied in order), in fp32.
        self.projections = []
        if self.head == "token_embeddings" and (hf_dir / PROJECTIONS_FILE).exists():
            from safetensors.torch import load_file

            tensors = load_file(str(hf_dir / PROJECTIONS_FILE), device=str(self.device))
            for index in range(sum(1 for key in tensors if key.endswith(".weight"))):
                self.projections.append((tensors[f"{index}.weight"].float(), tensors.get(f"{index}.bias")))
        # A decoder embedder builds no KV cache it would throw away.
        self.extra = {"use_cache": False} if "use_cache" in inspect.signature(self.model.forward).parameters else {}

        # Only the inputs the config declares (token_type_ids where the model takes them).
        self.inputs = [i["name"] for i in config["input"]]
        outputs = config["output"]
        if len(outputs) != 1:
            raise pb_utils.TritonModelException(f"model {name!r}: expected one output, the config declares {len(outputs)}")
        self.output = outputs[0]["name"]
        if self.head == "logits":
            declared = [int(d) for d in outputs[0]["dims"]]
            labels = int(self.model.config.num_labels)
            if declared[-1:] != [labels]:
                raise pb_utils.TritonModelException(
                    f"model {name!r}: {hf_dir} has {labels} labels but output {self.output!r} declares dims {declared}"
                )

    def execute(self, requests):
        # Host tensors (the python backend's default): valid until execute returns, and torch.cat copies them.
        parts = {name: [from_dlpack(pb_utils.get_input_tensor_by_name(r, name).to_dlpack()) for r in requests] for name in self.inputs}
        sizes = [t.shape[0] for t in parts[self.inputs[0]]]
        width = max(t.shape[1] for t in parts[self.inputs[0]])
        feed = {
            name: torch.cat([pad(t, (0, width - t.shape[1])) for t in tensors]).to(self.device, non_blocking=True)
            for name, tensors in parts.items()
        }
        with torch.inference_mode():
            if self.head == "token_embeddings":
                result = self.model(**feed, **self.extra).last_hidden_state.float()
                for weight, bias in self.projections:
                    result = torch.nn.functional.linear(result, weight, None if bias is None else bias.float())
                result = torch.nn.functional.normalize(result, p=2, dim=-1)
            elif self.head == "splade":
                logits = self.model(**feed).logits.float()
                result = (torch.log1p(torch.relu(logits)) * feed["attention_mask"].unsqueeze(-1).float()).max(1).values
            elif self.head != "logits":
                hidden = self.model(**feed, **self.extra).last_hidden_state.float()  # pool in fp32: sums over up to 512 tokens
                result = pool(hidden, feed["attention_mask"], self.pooling)
                if self.normalize:
                    result = torch.nn.functional.normalize(result, p=2, dim=1)
            else:
                result = self.model(**feed).logits.float()
        result = result.cpu().contiguous()
        responses, start = [], 0
        for size in sizes:
            tensor = pb_utils.Tensor.from_dlpack(self.output, to_dlpack(result[start : start + size]))
            start += size
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self):
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
