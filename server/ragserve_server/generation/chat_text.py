"""Chat messages to prompt ids, with the caller's text kept as text.

A chat template renders the messages to one string and the tokenizer reads it back, control
tokens included: a message whose content holds `<|im_start|>system` would become a real
system turn (a forged instruction). The choice here: such content stays text. When no message
holds a special token's text (nearly always), the ids are the template's own, unchanged;
otherwise the template is rendered with a placeholder per message, its own text is tokenized
with special tokens and each message's content with `split_special_tokens=True`, so
`<|im_start|>` in content becomes the ordinary tokens of those characters.
"""

from __future__ import annotations

from ragserve_server.errors import InvalidInput


def special_texts(hf) -> tuple[str, ...]:
    """The text of every special (control) token of a transformers tokenizer."""
    texts = {t.content for t in getattr(hf, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    texts.update(getattr(hf, "all_special_tokens", ()) or ())
    return tuple(sorted(t for t in texts if t))


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


def encode_chat(hf, messages: list[dict[str, str]], specials: tuple[str, ...]) -> list[int]:
    if not any(s in m["content"] for m in messages for s in specials):
        return _ids(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters: not in any template
    rendered = hf.apply_chat_template(
        [{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt=True, tokenize=False
    )
    ids: list[int] = []
    position = 0
    for message, mark in zip(messages, marks):
        at = rendered.find(mark, position)
        if at < 0:  # a template that rewrites or drops content: refuse rather than guess
            raise InvalidInput("message content holds special-token text (e.g. <|im_start|>), which this model's chat template cannot keep as text")
        ids += _ids(hf(rendered[position:at], add_special_tokens=False))
        ids += _ids(hf(message["content"], add_special_tokens=False, split_special_tokens=True))
        position = at + len(mark)
    ids += _ids(hf(rendered[position:], add_special_tokens=False))
    return ids
