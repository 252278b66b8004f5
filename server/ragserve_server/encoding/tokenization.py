"""Tokenization for the encoder models: truncation rules, token counts, length buckets.

Runs on a worker thread (HF `tokenizers` releases the GIL), never on the event loop.
Padding to length buckets lets Triton batch requests of different lengths together:
its dynamic batcher only groups requests whose tensors have the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from ragserve_server.errors import InvalidInput

TRUNCATE_NONE, TRUNCATE_END, TRUNCATE_START = "none", "end", "start"

@dataclass(frozen=True)
class TokenBatch:
    """Token ids of several sequences, padded to one length."""

    input_ids: np.ndarray  # int64 (rows, width)
    attention_mask: np.ndarray  # int64 (rows, width)
    token_type_ids: np.ndarray  # int64 (rows, width)


class EncoderTokenizer:
    """A `tokenizers` tokenizer with the model's limit applied per truncate mode."""

    def __init__(self, tokenizer_json: Path, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._untruncated = Tokenizer.from_file(str(tokenizer_json))
        padding = self._untruncated.padding or {}
        self._untruncated.no_padding()  # the file pads to 128 tokens: we pad to buckets ourselves
        self._untruncated.no_truncation()  # the file also truncates to 128: counts must see every token
        # The file's own pad id where it has one (XLM-R's <pad> is 1, not BERT's [PAD] 0).
        self.pad_id = padding.get("pad_id", self._untruncated.token_to_id("[PAD]") or 0)
        processor = self._untruncated.post_processor
        # Special tokens a (query, document) pair adds beyond a single text's: [SEP] for BERT.
        self._pair_extra = (
            processor.num_special_tokens_to_add(True) - processor.num_special_tokens_to_add(False) if processor else 0
        )
        # TRUNCATE_NONE uses the right-truncating tokenizer too: an over-long input shows up
        # as an encoding with overflow, found in the same single pass.
        self._singles = {TRUNCATE_END: self._truncating("right"), TRUNCATE_START: self._truncating("left")}
        self._singles[TRUNCATE_NONE] = self._singles[TRUNCATE_END]
        # Pairs (query, document): only the document (second sequence) is ever cut.
        self._pairs = {
            TRUNCATE_END: self._truncating("right", "only_second"),
            TRUNCATE_START: self._truncating("left", "only_second"),
        }
        self._pairs[TRUNCATE_NONE] = self._pairs[TRUNCATE_END]

    def _truncating(self, direction: str, strategy: str = "longest_first") -> Tokenizer:
        tokenizer = Tokenizer.from_str(self._untruncated.to_str())
        tokenizer.enable_truncation(self.max_tokens, direction=direction, strategy=strategy)
        return tokenizer

    def count(self, text: str) -> int:
        """Tokens of a text with special tokens, untruncated."""
        return len(self._untruncated.encode(text).ids)

    def encode(self, texts: list[str], truncate: str, *, what: str = "input") -> list[list[int]]:
        """Token ids per text; an over-long text with TRUNCATE_NONE is an InvalidInput naming it."""
        return [e.ids for e in self.encodings(texts, truncate, what=what)]

    def encodings(self, texts: list[str], truncate: str, *, what: str = "input") -> list[Encoding]:
        """Like `encode`, the whole encodings (ids, character offsets, tokens, overflow): Tokenize."""
        encodings = self._singles[truncate].encode_batch(texts)
        if truncate == TRUNCATE_NONE:
            self._check_no_overflow(encodings, texts, what)
        return encodings

    @property
    def vocab_size(self) -> int:
        return self._untruncated.get_vocab_size(with_added_tokens=True)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._untruncated.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_query(self, query: str, *, paired: bool) -> int:
        """Tokens of a rerank query (special tokens included); InvalidInput if over the limit.

        A query is never truncated. Paired with documents (a cross-encoder), it must leave
        room for the pair's extra special tokens and at least one document token.
        """
        tokens = self.count(query)
        limit = self.max_tokens - (self._pair_extra + 1 if paired else 0)
        if tokens > limit:
            room = " (the rest of the model's limit is kept for the document)" if paired else ""
            raise InvalidInput(
                f"query has {tokens} tokens, more than the {limit} allowed{room}; queries are never truncated: shorten it"
            )
        return tokens

    def chunks(self, text: str, *, query: str | None = None) -> list[str]:
        """`text` cut on token boundaries into pieces that each fit the model's limit alone, or
        beside `query` as a (query, piece) pair; a text that fits is one piece (Rerank's
        chunk_long_documents). Offsets come from the untruncated encoding, so no text is lost."""
        processor = self._untruncated.post_processor
        specials = processor.num_special_tokens_to_add(False) if processor else 0
        budget = self.max_tokens - specials if query is None else self.max_tokens - self.count(query) - self._pair_extra
        offsets = [span for span in self._untruncated.encode(text, add_special_tokens=False).offsets]
        if len(offsets) <= budget or budget < 1:
            return [text]
        return [text[offsets[i][0] : offsets[min(i + budget, len(offsets)) - 1][1]] for i in range(0, len(offsets), budget)]

    def encode_pairs(self, query: str, documents: list[str], truncate: str) -> list[Encoding]:
        """(query, document) pairs for a cross-encoder, truncated on the document side.

        Call `check_query` first: a query that leaves no room for the document cannot be paired.
        """
        encodings = self._pairs[truncate].encode_batch([(query, d) for d in documents])
        if truncate == TRUNCATE_NONE:
            for index, encoding in enumerate(encodings):
                if encoding.overflowing:
                    pair = len(self._untruncated.encode(query, documents[index]).ids)
                    raise InvalidInput(
                        f"document {index} with the query has {pair} tokens, more than the model's limit of "
                        f"{self.max_tokens}; shorten it or set truncate to TRUNCATE_END or TRUNCATE_START"
                    )
        return encodings

    def _check_no_overflow(self, encodings: list[Encoding], texts: list[str], what: str) -> None:
        for index, encoding in enumerate(encodings):
            if encoding.overflowing:
                raise InvalidInput(
                    f"{what} {index} has {self.count(texts[index])} tokens, more than the model's limit of "
                    f"{self.max_tokens}; shorten it or set truncate to TRUNCATE_END or TRUNCATE_START"
                )

    def pad(
        self, sequences: list[list[int]], width: int, type_ids: list[list[int]] | None = None, *, side: str = "right"
    ) -> TokenBatch:
        """Rows padded to `width` on `side` (the model's padding_side: its graph pools over the mask)."""
        ids = np.full((len(sequences), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        types = np.zeros((len(sequences), width), dtype=np.int64)
        for row, seq in enumerate(sequences):
            span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[row, span] = seq
            mask[row, span] = 1
            if type_ids is not None:
                types[row, span] = type_ids[row]
        return TokenBatch(ids, mask, types)
