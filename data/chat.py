"""Chat data: conversations rendered to text with a chat template, and which characters the loss counts.

A conversation is a list of turns, either ShareGPT's ``{"from": "human"|"gpt"|"system", "value": ...}``
(FuseChat-Mixture, ShareGPT) or ``{"role": "user"|"assistant"|"system", "content": ...}``. Rendering gives the
text and, with ``loss_on=assistant``, the character spans of the assistant turns: each turn's content and the
template's end-of-turn text after it (so the model learns to end its turn), not the role headers. A token
counts in the loss iff its last character lies in such a span (``token_mask``); the shards store that
mask next to the tokens (data/shards.py) and the datamodule turns it into labels -100 elsewhere.

Templates:

- ``openchat``: OpenChat-3.5's, ``GPT4 Correct User: ...<|end_of_turn|>GPT4 Correct Assistant:
  ...<|end_of_turn|>`` (its Hugging Face template without the leading BOS: documents are separated by EOS).
- ``tokenizer``: the tokenizer's own ``apply_chat_template``. The span of assistant turn i is the text between
  the rendering of turns [0, i) with the generation prompt and the rendering of turns [0, i]; a template that
  does not render a conversation's beginning as a prefix of the whole is refused (one line).
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError

CHAT_TEMPLATES = ("openchat", "tokenizer")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "system": "system"}
OPENCHAT_EOT = "<|end_of_turn|>"

Spans = List[Tuple[int, int]]


def messages(conversation: Any, where: str) -> List[Dict[str, str]]:
    """The turns of a conversation as [{role, content}], roles normalised (user, assistant, system)."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise DataError(f"{where}: a conversation must be a non-empty list of turns, got "
                        f"{type(conversation).__name__}.")
    out = []
    for j, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {j} is a {type(turn).__name__}, not a {{from, value}} or {{role, content}} "
                            "record.")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLES or not isinstance(content, str):
            raise DataError(f"{where}: turn {j} has role {role!r} and content of type {type(content).__name__}; "
                            f"roles: {', '.join(ROLES)}, content: a string.")
        out.append({"role": ROLES[role], "content": content})
    return out


def render_openchat(turns: Sequence[Dict[str, str]]) -> Tuple[str, Spans]:
    """OpenChat-3.5's template ('GPT4 Correct <Role>: <content><|end_of_turn|>' per turn); the spans of the
    assistant contents with their end-of-turn marker."""
    parts, spans, pos = [], [], 0
    for t in turns:
        head = f"GPT4 Correct {t['role'].title()}: "
        body = t["content"] + OPENCHAT_EOT
        parts += [head, body]
        pos += len(head)
        if t["role"] == "assistant":
            spans.append((pos, pos + len(body)))
        pos += len(body)
    return "".join(parts), spans


def _apply(tokenizer, turns, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise DataError(f"the tokenizer's apply_chat_template returned {type(text).__name__}, not text.")
    return text


def render_with_tokenizer(turns: Sequence[Dict[str, str]], tokenizer, where: str) -> Tuple[str, Spans]:
    """The tokenizer's chat template; assistant turn i spans render(turns[:i], generation prompt) ..
    render(turns[:i + 1])."""
    try:
        full = _apply(tokenizer, turns, False)
        spans = []
        for i, t in enumerate(turns):
            if t["role"] != "assistant":
                continue
            before = _apply(tokenizer, turns[:i], True)
            upto = _apply(tokenizer, turns[: i + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise DataError(f"{where}: the tokenizer's chat template does not render the conversation's first "
                                f"{i + 1} turn(s) as a prefix of the whole, so the assistant turns cannot be located; "
                                "use data.chat_template=openchat or data.loss_on=all.")
            spans.append((len(before), len(upto)))
    except DataError:
        raise
    except Exception as e:  # jinja errors: the template refuses this conversation (e.g. roles out of order)
        raise DataError(f"{where}: the tokenizer's chat template failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return full, spans


class ChatRenderer:
    """A conversation -> (text, spans that count in the loss, or None when every token counts)."""

    def __init__(self, template: str, loss_on: str, tokenizer=None):
        if template not in CHAT_TEMPLATES:
            raise DataError(f"data.chat_template must be one of {', '.join(CHAT_TEMPLATES)}; got '{template}'.")
        self.template, self.loss_on, self.tokenizer = template, loss_on, tokenizer

    def use_tokenizer(self, tokenizer) -> None:
        if self.template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise DataError("data.chat_template=tokenizer, but the tokenizer (data.tokenizer) has no chat template; "
                            "use data.chat_template=openchat.")
        self.tokenizer = tokenizer

    def identity(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"chat_template": self.template, "loss_on": self.loss_on}
        if self.template == "tokenizer" and self.tokenizer is not None:
            out["template_sha"] = hashlib.sha256(str(self.tokenizer.chat_template).encode()).hexdigest()[:16]
        return out

    def __call__(self, conversation: Any, where: str) -> Tuple[str, Optional[Spans]]:
        turns = messages(conversation, where)
        if self.template == "openchat":
            text, spans = render_openchat(turns)
        else:
            if self.tokenizer is None:
                raise DataError("data.chat_template=tokenizer needs the tokenizer before the data is read.")
            text, spans = render_with_tokenizer(turns, self.tokenizer, where)
        return text, (spans if self.loss_on == "assistant" else None)


def token_mask(offsets: np.ndarray, spans: Optional[Spans]) -> np.ndarray:
    """1 for each token whose last character (end - 1; start for an empty offset) lies in one of the (sorted,
    disjoint) character spans, else 0; all 1 when spans is None. offsets: [n, 2] character (start, end)."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if spans is None:
        return np.ones(len(offsets), dtype=np.uint8)
    if not spans or not len(offsets):
        return np.zeros(len(offsets), dtype=np.uint8)
    starts = np.array([s for s, _ in spans], dtype=np.int64)
    ends = np.array([e for _, e in spans], dtype=np.int64)
    last = np.maximum(offsets[:, 1] - 1, offsets[:, 0])
    j = np.searchsorted(starts, last, side="right") - 1
    inside = (j >= 0) & (last < ends[np.clip(j, 0, None)])
    return inside.astype(np.uint8)


def decoded_spans(tokenizer, ids: Sequence[int], mask: Sequence[int]) -> Tuple[str, Spans]:
    """A block of token ids decoded to text, with the character spans of its runs of mask 1: the text another
    tokenizer reads, and which part of it counts (the span bounds come from decoding the prefixes that end at
    the mask's changes, so a character split between two tokens may move a bound by one)."""
    ids, mask = list(ids), np.asarray(mask, dtype=np.uint8)

    def decode(x):
        return tokenizer.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    text = decode(ids)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]]))).tolist()
    bounds = [min(len(decode(ids[:c])), len(text)) if 0 < c < len(ids) else (0 if c == 0 else len(text))
              for c in changes]
    spans = [(bounds[k], bounds[k + 1]) for k in range(0, len(bounds), 2) if bounds[k + 1] > bounds[k]]
    return text, spans
