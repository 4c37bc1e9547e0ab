"""Instruction data (alpaca, chat, gsm8k) -> token ids with labels on the responses only.

A conversation is rendered into text *segments*, each either prompt or response. Each segment is
tokenized on its own and the ids are concatenated, so the mask boundary never falls inside a token
and a single-turn prompt is tokenized exactly as `generate` will see it (the prompt rendered with
`add_generation_prompt=True`).

With a chat template the segments come from rendering the conversation one turn at a time:
    render(messages[:i], add_generation_prompt=True)  -> everything before assistant turn i
    render(messages[:i + 1])                           -> ... plus that turn (and its end token)
Without one (e.g. a base GPT-2), alpaca and gsm8k rows use the Alpaca prompt and the EOS token
ends the response; chat rows need a template.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deltatune.data.files import Row
from deltatune.errors import DeltatuneError

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Segment:
    text: str
    is_response: bool


def alpaca_parts(row: Row) -> tuple[str, str, str]:
    """(instruction, input, output) of an alpaca row; `input` may be missing or empty."""
    extra = row.values.get("input") or ""
    if not isinstance(extra, str):
        raise row.error(f"field 'input' must be a string, got {extra!r}")
    return row.text("instruction"), extra, row.text("output")


def gsm8k_parts(row: Row) -> tuple[str, str, str]:
    return row.text("question"), "", row.text("answer")


def parts_to_messages(instruction: str, extra: str, response: str) -> list[dict[str, str]]:
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def chat_messages(row: Row, field: str = "messages") -> list[dict[str, str]]:
    messages = row.get(field)
    if not isinstance(messages, list) or not messages:
        raise row.error(f"field {field!r} must be a non-empty list of {{role, content}} messages")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise row.error(f"{field}[{number}] must be {{\"role\": str, \"content\": str}}, "
                            f"got {message!r}"[:300])
        if message["role"] not in ROLES:
            raise row.error(f"{field}[{number}]: unknown role {message['role']!r} "
                            f"(one of {', '.join(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def template_segments(tokenizer: Any, messages: list[dict], row: Row) -> list[Segment]:
    """Prompt/response segments of a conversation rendered with the tokenizer's chat template."""
    segments: list[Segment] = []
    done = ""  # text rendered so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        if not before.startswith(done) or not through.startswith(before):
            raise row.error("the tokenizer's chat template does not render this conversation "
                            "turn by turn, so the response tokens cannot be located")
        segments.append(Segment(before[len(done):], False))
        segments.append(Segment(through[len(before):], True))
        done = through
    rest = _render(tokenizer, messages, generation_prompt=False)
    if len(rest) > len(done) and rest.startswith(done):
        segments.append(Segment(rest[len(done):], False))
    return [s for s in segments if s.text]


def plain_segments(tokenizer: Any, instruction: str, extra: str, response: str) -> list[Segment]:
    """Alpaca-prompt segments for tokenizers without a chat template; EOS ends the response."""
    prompt = (ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
              if extra.strip() else ALPACA_PROMPT.format(instruction=instruction))
    return [Segment(prompt, False), Segment(response + (tokenizer.eos_token or ""), True)]


def bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when this tokenizer normally starts a text with BOS (Llama), else [] (GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int   # tokens before the last response: what generation is given
    target: str          # the last response's text, for exact-match evaluation
    truncated: bool


def encode_segments(tokenizer: Any, segments: list[Segment], prefix_ids: list[int],
                    max_length: int, train_on_prompt: bool, target: str) -> Encoded:
    """Token ids of the segments after `prefix_ids` (BOS or nothing), labels -100 on prompt
    segments (unless train_on_prompt), cut to max_length."""
    input_ids = list(prefix_ids)
    labels = list(prefix_ids) if train_on_prompt else [-100] * len(prefix_ids)
    prompt_length = 0
    for segment in segments:
        ids = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        if segment.is_response:
            prompt_length = len(input_ids)
        input_ids += ids
        labels += ids if (segment.is_response or train_on_prompt) else [-100] * len(ids)
    truncated = len(input_ids) > max_length
    return Encoded(input_ids[:max_length], labels[:max_length], min(prompt_length, max_length),
                   target, truncated)
