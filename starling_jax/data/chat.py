"""HH prompt parsing and named chat templates (the single source of truth for chat formats).

An Anthropic-HH prompt (`"\\n\\nHuman: u1\\n\\nAssistant: a1\\n\\nHuman: u2\\n\\nAssistant:"`) is parsed into
messages `[{"role": "user", ...}, {"role": "assistant", ...}, {"role": "user", ...}]` (the last, open assistant
turn is where the answer goes). Conversations are rendered with a Jinja chat template through the HF tokenizer's
`apply_chat_template(..., tokenize=False)`, so the named templates below and a tokenizer's own template go
through the same code.

BOS handling: the named templates contain no BOS text. The rendered text is tokenized with
`add_special_tokens=True`, so the Llama/Mistral tokenizer prepends `<s>` exactly as Starling-RM-7B-alpha's
`tokenizer(text)` did (writing `<s>` into the text instead would change the first token: `<s>[INST]` tokenizes
`[` without the SentencePiece prefix space). A tokenizer's own template (`template="tokenizer"`) usually writes
`{{ bos_token }}` itself, so it is tokenized with `add_special_tokens=False`, as HF's `apply_chat_template` does.

Templates:
- `llama2_chat` (Starling-RM-7B-alpha): per turn `[INST] {user} ` + `[/INST] {assistant}</s> `, joined and
  stripped; the reward is read on the final `</s>`.
- `openchat_3.5`: `GPT4 Correct User: {u}<|end_of_turn|>GPT4 Correct Assistant: {a}<|end_of_turn|>`.
- `chatml`: `<|im_start|>{role}\\n{content}<|im_end|>` joined by `\\n` (no newline after the final turn, so the
  reward is read on `<|im_end|>`; the Mistral vocabulary splits these markers into several pieces).
- `raw`: the HH text itself + answer + EOS.
"""

from __future__ import annotations

import re
from typing import Any

from starling_jax.errors import DataError

Message = dict[str, str]

LLAMA2_CHAT = (
    "{% set ns = namespace(text='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% set ns.text = ns.text + '[INST] ' + m['content'] + ' ' %}"
    "{% elif m['role'] == 'assistant' %}{% set ns.text = ns.text + '[/INST] ' + m['content'] + '</s> ' %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% set ns.text = ns.text + '[/INST]' %}{% endif %}"
    "{{ ns.text | trim }}"
)

OPENCHAT_3_5 = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'GPT4 Correct User: ' + m['content'] + '<|end_of_turn|>' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'GPT4 Correct Assistant: ' + m['content'] + '<|end_of_turn|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}"
    "{% if not loop.last or add_generation_prompt %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

RAW = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '\\n\\nHuman: ' + m['content'] }}"
    "{% else %}{{ '\\n\\nAssistant: ' + m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% else %}{{ eos_token }}{% endif %}"
)

TEMPLATES: dict[str, str] = {
    "llama2_chat": LLAMA2_CHAT,
    "openchat_3.5": OPENCHAT_3_5,
    "chatml": CHATML,
    "raw": RAW,
}
# "tokenizer" = use the tokenizer's own `chat_template`.
TEMPLATE_NAMES = (*TEMPLATES, "tokenizer")

_HH_SPLIT = re.compile(r"\n\n(Human|Assistant):")


def get_template(name: str) -> str | None:
    """Jinja source of a named template (None for "tokenizer": the tokenizer's own)."""
    if name == "tokenizer":
        return None
    if name not in TEMPLATES:
        raise DataError(f"unknown chat template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    return TEMPLATES[name]


def adds_bos_by_tokenizer(name: str) -> bool:
    """Whether rendered text of this template is tokenized with add_special_tokens=True (see module doc)."""
    return name != "tokenizer"


def parse_hh(prompt: Any) -> list[Message]:
    """Parse an HH prompt into messages; the last turn must be an open `Assistant:` turn.

    Raises ValueError with the reason when the prompt does not parse (the caller adds file/row).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt is {type(prompt).__name__}, not a string")
    text = prompt
    if not text.startswith("\n\n"):
        # tolerate missing leading blank line / leading whitespace before the first "Human:"
        stripped = text.lstrip()
        if not stripped.startswith("Human:"):
            raise ValueError("prompt does not start with '\\n\\nHuman:'")
        text = "\n\n" + stripped
    parts = _HH_SPLIT.split(text)
    if parts[0].strip():
        raise ValueError("text before the first '\\n\\nHuman:' turn")
    roles = parts[1::2]
    contents = parts[2::2]
    if not roles or roles[-1] != "Assistant" or contents[-1].strip():
        raise ValueError("prompt does not end with an open '\\n\\nAssistant:' turn")
    messages: list[Message] = []
    expected = "Human"
    for role, content in zip(roles[:-1], contents[:-1]):
        if role != expected:
            raise ValueError(f"turns do not alternate Human/Assistant (turn {len(messages) + 1} is {role})")
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
        expected = "Assistant" if role == "Human" else "Human"
    if expected != "Assistant":  # the open Assistant turn must follow a Human turn
        raise ValueError("turns do not alternate Human/Assistant (open Assistant turn follows an Assistant turn)")
    return messages


def to_hh(messages: list[Message]) -> str:
    """Inverse of `parse_hh`: messages ending with a user turn → HH prompt with an open Assistant turn."""
    out = []
    for m in messages:
        out.append(("\n\nHuman: " if m["role"] == "user" else "\n\nAssistant: ") + m["content"])
    return "".join(out) + "\n\nAssistant:"


def render(tokenizer, messages: list[Message], template: str, *, answer: str | None = None) -> str:
    """Render `messages` (+ `answer` as the final assistant turn) with a named template.

    `answer=None` renders the prompt part with the generation prompt (the text before the answer).
    """
    source = get_template(template)
    if source is None and not getattr(tokenizer, "chat_template", None):
        raise DataError("template 'tokenizer' requested but the tokenizer has no chat_template")
    if answer is None:
        conv, gen = messages, True
    else:
        conv, gen = [*messages, {"role": "assistant", "content": answer}], False
    return tokenizer.apply_chat_template(conv, chat_template=source, tokenize=False, add_generation_prompt=gen)
