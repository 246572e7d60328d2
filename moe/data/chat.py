"""Chat fine-tuning data (``data.format=chat``): conversations rendered with a chat template,
tokenized, and flagged token by token as trained (assistant replies) or context (the rest).

A record holds ``messages`` (a list of ``{"role", "content"}``) or ``prompt`` and
``response`` (one user turn and its reply). An assistant message's trained text is the
difference between the template's rendering of the conversation up to and including it and
its rendering of the conversation before it with the generation prompt: the reply and what
closes the turn, so that the model learns to stop. Each piece is tokenized on its own, so
the flags are exact token by token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from moe.typed_config import ConfigError

from .config import DataSection

# Used when neither data.chat_template nor the source model gives a template.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '<|end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special-token strings it may refer to."""

    text: str
    special_tokens: dict[str, str] = field(default_factory=dict)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=self.text,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )
        return rendered[0]


def chat_template(data: DataSection, model_dir: Path | None = None) -> ChatTemplate:
    """``data.chat_template`` (a Jinja file), else the template of ``model_dir`` (a Hugging
    Face model directory, or one of our checkpoints of a chat run), else ``PLAIN_TEMPLATE``."""
    if data.chat_template:
        path = Path(data.chat_template).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.chat_template={data.chat_template}: no such file")
        return ChatTemplate(path.read_text(encoding="utf-8"))
    if model_dir is not None and (found := _model_template(model_dir)) is not None:
        return found
    return ChatTemplate(PLAIN_TEMPLATE)


def template_files(template: ChatTemplate) -> dict[str, str]:
    """The template as a Hugging Face directory holds it, for checkpoints: evaluation and
    training from a checkpoint then render chat data as the run did."""
    config = {"chat_template": template.text, **template.special_tokens}
    return {"tokenizer_config.json": json.dumps(config, indent=1)}


def _model_template(model_dir: Path) -> ChatTemplate | None:
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    text = config.get("chat_template")
    if isinstance(text, list):  # named templates: the default one
        text = next((t["template"] for t in text if t.get("name") == "default"), None)
    if (model_dir / "chat_template.jinja").is_file():
        text = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if not text:
        return None
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            special[name] = token
    return ChatTemplate(text, special)


def conversations(records: Any, where: str) -> list[list[dict]]:
    """Each record's messages, checked; ``records`` is a ``datasets.Dataset``."""
    columns = set(records.column_names)
    if "messages" not in columns and not {"prompt", "response"} <= columns:
        raise ConfigError(
            f"data.format=chat: {where} has fields {sorted(columns)}; each record needs "
            "'messages' (a list of {role, content}) or 'prompt' and 'response'"
        )
    chats = []
    for i, record in enumerate(records):
        if record.get("messages") is not None:
            messages = record["messages"]
        else:
            messages = [
                {"role": "user", "content": record.get("prompt")},
                {"role": "assistant", "content": record.get("response")},
            ]
        chats.append(_checked(messages, f"{where}, record {i}"))
    return chats


def _checked(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"data.format=chat: {where}: messages must be a non-empty list")
    clean = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise ConfigError(
                f"data.format=chat: {where}: each message needs a role among {ROLES} and a "
                f"string content, got {message!r}"[:300]
            )
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise ConfigError(f"data.format=chat: {where}: no assistant message to train on")
    return clean


def pieces(messages: list[dict], template: ChatTemplate) -> list[tuple[str, bool]]:
    """The conversation's rendering cut into (text, trained) pieces, in order."""
    out, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[: i + 1])
        if not before.startswith(done) or not through.startswith(before):
            raise ConfigError(
                "the chat template does not render a conversation as a growing prefix (it "
                "rewrites earlier turns); set data.chat_template to a template that does"
            )
        out += [(before[len(done) :], False), (through[len(before) :], True)]
        done = through
    rest = template.render(messages)[len(done) :]
    return [(text, trained) for text, trained in [*out, (rest, False)] if text]


def tokenize_chats(
    chats: list[list[dict]], tokenizer: Tokenizer, template: ChatTemplate
) -> tuple[np.ndarray, np.ndarray]:
    """All conversations as one int32 token stream and a bool stream: token j is one the
    model is trained to predict (part of an assistant reply)."""
    ids, trained = [], []
    for chat in chats:
        for text, is_reply in pieces(chat, template):
            piece = tokenizer.encode(text, add_special_tokens=False).ids
            ids.extend(piece)
            trained.extend([is_reply] * len(piece))
    return np.asarray(ids, dtype=np.int32), np.asarray(trained, dtype=bool)
