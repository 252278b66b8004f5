"""LLM rerankers: Rerank models served by a generation model's prefill-only scoring.

An entry (`LlmReranker`) is a registry fact of its generation model (`ModelSpec.llm_rerankers`):
the prompt templates, the candidate tokens whose logits are read at the position after the
prompt, and the limits. No weights of their own: the generation model's Triton model answers
(generation_contract `candidate_token_ids` -> `candidate_logits`, one prefill per prompt).
services/rerank_llm.py builds the prompts and turns the logits into scores.

- POINTWISE: one prompt per (query, document), `user` with {query} and {document};
  score = logit(candidates[0]) - logit(candidates[1]) ("Yes" minus "No") at the next token;
  relevance_score = sigmoid(score) (the two-token probability of "Yes"), raw_score = score.
- LISTWISE in FIRST's style (Reddy et al. 2024, "FIRST: Faster Improved Listwise Reranking
  with Single Token Decoding"): up to `window` passages labelled with single-token
  identifiers ([A], [B], ...: `candidates` are the labels) in one prompt, `user` with {query},
  {num} and {passages} (each passage rendered with `passage`, {label} and {passage}); the
  prompt ends with `assistant_prefix` ("[") so that the next token is the first identifier
  of the ranking, and the window is ordered by the identifiers' logits at that one position
  (one forward pass per window). Longer lists: a sliding window from the end of the list to
  its start (RankGPT's / FIRST's), `stride` positions at a time, each window re-ordering the
  current ranking. relevance_score = (n - rank) / n for the final rank (0 = best) of n
  documents, so it follows the order exactly; raw_score = the document's identifier logit
  in the last window that placed it (comparable within one window only).
"""

from __future__ import annotations

from dataclasses import dataclass

POINTWISE, LISTWISE = "pointwise", "listwise"
METHODS = (POINTWISE, LISTWISE)


@dataclass(frozen=True)
class LlmReranker:
    name: str  # the Rerank model name requests ask for
    method: str  # POINTWISE or LISTWISE
    user: str  # the user message template (fields above)
    candidates: tuple[str, ...]  # tokens read after the prompt: ("Yes", "No"), or the labels
    max_documents: int  # documents per Rerank call
    max_query_tokens: int  # longer: INVALID_ARGUMENT, or cut by the request's truncate mode
    max_document_tokens: int  # per document (listwise: per passage), the same
    system: str | None = None  # the system message; None = the chat template's default
    passage: str = ""  # LISTWISE: one passage in the prompt, with {label} and {passage}
    assistant_prefix: str = ""  # text after the chat template's generation prompt
    window: int = 0  # LISTWISE: passages per prompt (at most len(candidates))
    stride: int = 0  # LISTWISE: positions the window moves towards the start each time

    def validate(self, context_tokens: int) -> None:
        where = f"LLM reranker {self.name!r}"
        if self.method not in METHODS:
            raise ValueError(f"{where}: unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.max_documents < 1 or self.max_query_tokens < 1 or self.max_document_tokens < 1:
            raise ValueError(f"{where}: max_documents, max_query_tokens and max_document_tokens must be >= 1")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"{where}: candidates repeat a token: {self.candidates}")
        if self.method == POINTWISE:
            if len(self.candidates) != 2:
                raise ValueError(f"{where}: a pointwise reranker reads two candidates (yes, no), got {self.candidates}")
            if "{document}" not in self.user or "{query}" not in self.user:
                raise ValueError(f"{where}: the user template needs {{query}} and {{document}}")
            budget = self.max_query_tokens + self.max_document_tokens
        else:
            if not 1 <= self.window <= len(self.candidates):
                raise ValueError(f"{where}: window {self.window} must be between 1 and the {len(self.candidates)} labels")
            if not 1 <= self.stride <= self.window:
                raise ValueError(f"{where}: stride {self.stride} must be between 1 and the window ({self.window})")
            if "{passages}" not in self.user or "{label}" not in self.passage or "{passage}" not in self.passage:
                raise ValueError(f"{where}: the user template needs {{passages}}, the passage template {{label}} and {{passage}}")
            budget = self.user.count("{query}") * self.max_query_tokens + self.window * self.max_document_tokens
        if budget >= context_tokens:
            raise ValueError(f"{where}: its limits ({budget} tokens of query and documents) leave no room in the context ({context_tokens})")


def smollm2_rerankers() -> tuple[LlmReranker, ...]:
    """The rerankers served over the built-in SmolLM2-135M-Instruct (context 2,048 tokens).

    "Yes" (10539) and "No" (5230) are single tokens of its tokenizer, and so is each letter
    after "[" (A = 49 ... T = 68): the gateway checks both at start-up. Listwise passages are
    cut to 80 tokens each, so 20 of them, the query twice and the template fit the context."""
    return (
        LlmReranker(
            name="smollm2-pointwise",
            method=POINTWISE,
            user="Query: {query}\nDocument: {document}\nDoes the document answer the query? Answer Yes or No.",
            candidates=("Yes", "No"),
            max_documents=1000,
            max_query_tokens=256,
            max_document_tokens=1024,
        ),
        LlmReranker(
            name="smollm2-listwise",
            method=LISTWISE,
            system="You rank passages by how relevant they are to a search query.",
            user=(
                "Here are {num} passages, each with an identifier in brackets.\n\n{passages}\n"
                "Search query: {query}\n"
                "Rank the {num} passages from the most to the least relevant to the search query. "
                "Answer with the identifiers only, best first, like [B] > [A] > [C]."
            ),
            passage="[{label}] {passage}\n",
            assistant_prefix="[",
            candidates=tuple("ABCDEFGHIJKLMNOPQRST"),
            window=20,
            stride=10,
            max_documents=100,
            max_query_tokens=64,
            max_document_tokens=80,
        ),
    )
