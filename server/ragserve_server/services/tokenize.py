"""ragserve.v1.Tokenize: a served model's tokenizer, with Embed's truncation rules.

Every served model has one: embedding models and cross-encoders (the gateway's own
`EncoderTokenizer`), bi-encoder rerankers (their embedding model's) and generation models
(their tokenizer.json, as for a raw prompt; chat templates are Generate's business).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Executor

import grpc

from ragserve.v1 import common_pb2, tokenize_pb2, tokenize_pb2_grpc
from ragserve_server.models.catalog import BI_ENCODER, CROSS_ENCODER, EMBEDDING, GENERATION, MAXSIM, Catalog
from ragserve_server.errors import InvalidInput
from ragserve_server.services.common import check_texts, input_type_name, off_loop, requested_model, truncate_mode
from ragserve_server.encoding.tokenization import EncoderTokenizer

# The default model (empty name) is the default embedding model.
KINDS = (EMBEDDING, CROSS_ENCODER, BI_ENCODER, GENERATION, MAXSIM)


class TokenizeService(tokenize_pb2_grpc.TokenizeServicer):
    def __init__(
        self, catalog: Catalog, tokenizers: Mapping[str, EncoderTokenizer], executor: Executor, max_inputs_per_call: int
    ) -> None:
        self.catalog = catalog
        self.executor = executor
        self.max_inputs = max_inputs_per_call
        self.tokenizers: dict[str, EncoderTokenizer] = dict(tokenizers)
        for model in catalog.models:
            if model.kind in (BI_ENCODER, MAXSIM):
                self.tokenizers[model.name] = self.tokenizers[model.embedding_model]
            elif model.name not in self.tokenizers:
                self.tokenizers[model.name] = EncoderTokenizer(model.model_dir / "tokenizer.json", model.max_input_tokens)

    async def Tokenize(self, request: tokenize_pb2.TokenizeRequest, context: grpc.aio.ServicerContext) -> tokenize_pb2.TokenizeResponse:
        return await self.tokenize(request)

    async def Detokenize(self, request: tokenize_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext) -> tokenize_pb2.DetokenizeResponse:
        return await self.detokenize(request)

    async def tokenize(self, request: tokenize_pb2.TokenizeRequest) -> tokenize_pb2.TokenizeResponse:
        model = self.catalog.get(requested_model(request.model), KINDS)
        texts = list(request.inputs)
        check_texts(texts, self.max_inputs)
        truncate = truncate_mode(request.truncate)
        prefix = model.prefixes.get(input_type_name(request.input_type), "")
        tokenizer = self.tokenizers[model.name]
        results = await off_loop(self.executor, _tokenize, tokenizer, texts, prefix, truncate, request.return_tokens)
        tokens = sum(len(r.ids) for r in results)
        return tokenize_pb2.TokenizeResponse(
            model=model.name, results=results, usage=common_pb2.Usage(prompt_tokens=tokens, total_tokens=tokens)
        )

    async def detokenize(self, request: tokenize_pb2.DetokenizeRequest) -> tokenize_pb2.DetokenizeResponse:
        model = self.catalog.get(requested_model(request.model), KINDS)
        tokenizer = self.tokenizers[model.name]
        ids = list(request.ids)
        vocab = tokenizer.vocab_size
        for index, token in enumerate(ids):
            if token >= vocab:
                raise InvalidInput(f"ids[{index}] is {token}, outside model {model.name}'s vocabulary: ids go from 0 to {vocab - 1}")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True  # default: skipped
        text = await off_loop(self.executor, lambda: tokenizer.decode(ids, skip_special_tokens=skip))
        return tokenize_pb2.DetokenizeResponse(model=model.name, text=text)


def _tokenize(
    tokenizer: EncoderTokenizer, texts: list[str], prefix: str, truncate: str, return_tokens: bool
) -> list[tokenize_pb2.TokenizedInput]:
    sent = [prefix + t for t in texts] if prefix else texts
    results = []
    for text, encoding in zip(sent, tokenizer.encodings(sent, truncate)):
        # Offsets into the caller's text: the prefix's own tokens get (0, 0), like special tokens.
        starts, ends = [], []
        for start, end in encoding.offsets:
            if end <= len(prefix):
                start = end = 0
            else:
                start, end = max(start - len(prefix), 0), end - len(prefix)
            starts.append(start)
            ends.append(end)
        untruncated = tokenizer.count(text) if encoding.overflowing else len(encoding.ids)
        results.append(
            tokenize_pb2.TokenizedInput(
                ids=encoding.ids,
                offset_starts=starts,
                offset_ends=ends,
                tokens=encoding.tokens if return_tokens else (),
                untruncated_count=untruncated,
            )
        )
    return results
