"""Rerank by a generation model: the LLM rerankers of models/llm_rerankers.py.

The gateway renders each prompt with the model's chat template (transformers' renderer, as
Generate does) and the reranker's templates, tokenizes it, and asks the generation model for
the logits of the candidate tokens at the position after the prompt (generation_contract
`score_tensors`: prefill only, nothing generated). The engine batches the prompts that arrive
together into one pass, so a pointwise call sends all its prompts at once (at most
`MAX_IN_FLIGHT` per call); a listwise call sends its windows one after the other, each
depending on the ranking the previous one left. Scores: llm_rerankers.py's docstring.

Documents and queries longer than the reranker's limits are INVALID_ARGUMENT unless the
request's `truncate` says which end to cut (on token boundaries; the kept tokens are decoded
back to text for the template). `chunk_long_documents` is for encoders only.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

import numpy as np

from ragserve_server.backend.protocol import InferenceBackend
from ragserve_server.calls.admission import current_priority
from ragserve_server.encoding.tokenization import TRUNCATE_END, TRUNCATE_NONE
from ragserve_server.errors import BackendError, Cancelled, InvalidInput
from ragserve_server.models import generation_contract as contract
from ragserve_server.models.catalog import ServedModel
from ragserve_server.models.llm_rerankers import POINTWISE, LlmReranker
from ragserve_server.services.common import off_loop

MAX_IN_FLIGHT = 32  # pointwise prompts of one call in the engine at once (its queue is shared)


class PromptBuilder:
    """The reranker's prompts as token ids, and its candidate tokens' ids (checked at start-up)."""

    def __init__(self, model: ServedModel) -> None:
        from transformers import AutoTokenizer

        self.model = model
        self.reranker: LlmReranker = model.llm_reranker
        self.hf = AutoTokenizer.from_pretrained(model.model_dir)
        self.candidate_ids = self._candidate_ids()

    def _candidate_ids(self) -> list[int]:
        """Each candidate must be ONE token right after the prompt's end (the generation prompt
        and `assistant_prefix`), else the logit read there would not be its probability."""
        head = self._render([{"role": "user", "content": "?"}])
        before = self._encode(head)
        ids = []
        for candidate in self.reranker.candidates:
            after = self._encode(head + candidate)
            if len(after) != len(before) + 1 or after[: len(before)] != before:
                raise ValueError(
                    f"LLM reranker {self.reranker.name!r}: candidate {candidate!r} is not a single token after the prompt "
                    f"of {self.model.model_dir} (tokens {after[len(before) - 1:]}); choose candidates that are"
                )
            ids.append(after[-1])
        return ids

    def _render(self, messages: list[dict[str, str]]) -> str:
        if self.reranker.system is not None:
            messages = [{"role": "system", "content": self.reranker.system}, *messages]
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text + self.reranker.assistant_prefix

    def _encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def fit(self, texts: list[str], limit: int, truncate: str, what: str) -> list[str]:
        """Texts within `limit` tokens: cut at the end or start that `truncate` names, else refused."""
        encoded = self.hf(texts, add_special_tokens=False)["input_ids"]
        out = []
        for index, (text, ids) in enumerate(zip(texts, encoded)):
            if len(ids) <= limit:
                out.append(text)
            elif truncate == TRUNCATE_NONE:
                label = what if len(texts) == 1 else f"{what} {index}"
                raise InvalidInput(
                    f"{label} has {len(ids)} tokens, more than the {limit} that reranker {self.reranker.name!r} takes; "
                    f"shorten it or set truncate to TRUNCATE_END / TRUNCATE_START"
                )
            else:
                kept = ids[:limit] if truncate == TRUNCATE_END else ids[-limit:]
                out.append(self.hf.decode(kept))
        return out

    def pointwise(self, query: str, document: str) -> list[int]:
        content = self.reranker.user.format(query=query, document=document)
        return self._encode(self._render([{"role": "user", "content": content}]))

    def listwise(self, query: str, passages: list[str]) -> list[int]:
        r = self.reranker
        lines = "".join(r.passage.format(label=r.candidates[i], passage=p) for i, p in enumerate(passages))
        content = r.user.format(query=query, num=len(passages), passages=lines)
        return self._encode(self._render([{"role": "user", "content": content}]))


class LlmRerankers:
    """Scores for Rerank calls to LLM rerankers (RerankService dispatches here by kind)."""

    def __init__(self, models: list[ServedModel], backend: InferenceBackend, executor: Executor) -> None:
        self.backend = backend
        self.executor = executor
        self.builders = {m.name: PromptBuilder(m) for m in models}

    def check(self, model: ServedModel, documents: int, chunk_long_documents: bool) -> None:
        """What a request may ask of this reranker, before any work."""
        reranker = self.builders[model.name].reranker
        if chunk_long_documents:
            raise InvalidInput(
                f"chunk_long_documents is not supported by LLM reranker {model.name!r}; "
                f"set truncate to cut documents over {reranker.max_document_tokens} tokens"
            )
        if documents > reranker.max_documents:
            raise InvalidInput(
                f"too many documents for {model.name!r}: {documents} > {reranker.max_documents} per call"
                + (f" (a sliding window of {reranker.window}, stride {reranker.stride})" if reranker.method != POINTWISE else "")
                + "; split them over calls"
            )

    async def scores(
        self, model: ServedModel, query: str, documents: list[str], truncate: str, timeout: float | None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(relevance, raw score, prompt tokens) of each document, in request order."""
        builder = self.builders[model.name]
        reranker = builder.reranker

        def fit() -> tuple[str, list[str]]:
            (q,) = builder.fit([query], reranker.max_query_tokens, truncate, "query")
            return q, builder.fit(documents, reranker.max_document_tokens, truncate, "document")

        query, documents = await off_loop(self.executor, fit)
        if reranker.method == POINTWISE:
            return await self._pointwise(model, builder, query, documents, timeout)
        return await self._listwise(model, builder, query, documents, timeout)

    async def _pointwise(self, model, builder: PromptBuilder, query: str, documents: list[str], timeout):
        prompts = await off_loop(self.executor, lambda: [builder.pointwise(query, d) for d in documents])
        self._check_lengths(model, prompts)
        gate = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def one(prompt: list[int]) -> np.ndarray:
            async with gate:
                return await self._logits(model, prompt, builder.candidate_ids, timeout)

        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the rest
                tasks = [group.create_task(one(p)) for p in prompts]
        except BaseExceptionGroup as failed:  # the first failure, as itself (its status code)
            raise failed.exceptions[0] from None
        logits = np.stack([t.result() for t in tasks])
        raw = logits[:, 0] - logits[:, 1]
        return 1.0 / (1.0 + np.exp(-raw)), raw, sum(map(len, prompts))

    async def _listwise(self, model, builder: PromptBuilder, query: str, documents: list[str], timeout):
        reranker = builder.reranker
        n = len(documents)
        order = list(range(n))  # the current ranking, best first; starts in request order
        raw = np.zeros(n)
        tokens = 0
        end = n
        start = max(0, end - reranker.window)
        while True:  # from the end of the list to its start (RankGPT / FIRST)
            window = order[start:end]
            prompt = await off_loop(self.executor, builder.listwise, query, [documents[i] for i in window])
            self._check_lengths(model, [prompt])
            tokens += len(prompt)
            logits = await self._logits(model, prompt, builder.candidate_ids[: len(window)], timeout)
            ranked = sorted(range(len(window)), key=lambda j: -logits[j])  # stable: ties keep the window's order
            order[start:end] = [window[j] for j in ranked]
            raw[window] = logits
            if start == 0:
                break
            end -= reranker.stride
            start = max(0, end - reranker.window)
        relevance = np.empty(n)
        relevance[order] = (n - np.arange(n)) / n
        return relevance, raw, tokens

    def _check_lengths(self, model: ServedModel, prompts: list[list[int]]) -> None:
        for prompt in prompts:
            if len(prompt) > model.max_input_tokens:
                raise InvalidInput(
                    f"a prompt of {model.name!r} has {len(prompt)} tokens, more than the context of {model.max_input_tokens}: "
                    f"shorten the query or the documents, or set truncate"
                )

    async def _logits(self, model: ServedModel, prompt: list[int], candidates: list[int], timeout: float | None) -> np.ndarray:
        inputs = contract.score_tensors(prompt, candidates)
        stream = self.backend.stream(
            model.triton_model, inputs, contract.SCORE_OUTPUT_NAMES, timeout=timeout, priority=current_priority()
        )
        try:
            async for outputs, final in stream:
                if contract.cancelled_by_server(outputs, final):
                    raise Cancelled("the model server closed the scoring request")
                logits = contract.response_candidate_logits(outputs, len(candidates))
                if logits is not None:
                    return logits
                if final:
                    break
        finally:
            await stream.aclose()
        raise BackendError(
            f"{model.triton_model} returned no candidate_logits: the generation model lacks the scoring extension "
            "(generation_contract.py; README 'LLM rerankers')"
        )
