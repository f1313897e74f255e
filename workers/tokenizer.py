"""Tokenizers: a checkpoint's `tokenizer.json` through the `tokenizers` library, or a byte-level one for
preset models; plus incremental detokenization and the chat template of `tokenizer_config.json`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from partita.workers.errors import ModelLoadError

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class Tokenizer:
    """Text <-> token ids for one model.

    eos_token_ids: ids that end generation; chat_template: a Jinja template or None.
    """

    def __init__(self, tokenizer: HFTokenizer, eos_token_ids: tuple[int, ...], bos_token: str | None = None,
                 eos_token: str | None = None, chat_template: str | None = None, add_bos_token: bool = False):
        self._tok = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self._add_bos_id = tokenizer.token_to_id(bos_token) if (add_bos_token and bos_token) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos_id is not None and (not ids or ids[0] != self._add_bos_id):
            ids = [self._add_bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Renders chat messages with the model's template (sandboxed Jinja, as transformers does)."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "")

    @classmethod
    def from_dir(cls, path: str, eos_token_ids: tuple[int, ...]) -> "Tokenizer":
        """Reads tokenizer.json (required) and tokenizer_config.json (special tokens, chat template)."""
        tok_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_path):
            raise ModelLoadError(f"{path!r} has no tokenizer.json (pass token ids, or add a fast tokenizer)")
        try:
            tok = HFTokenizer.from_file(tok_path)
        except Exception as e:  # the tokenizers library raises bare Exceptions on malformed files
            raise ModelLoadError(f"cannot parse {tok_path}: {e}") from None
        cfg: dict[str, Any] = {}
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_path = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        eos_ids = tuple(eos_token_ids)
        eos_token = _token_text(cfg.get("eos_token"))
        if not eos_ids and eos_token and tok.token_to_id(eos_token) is not None:
            eos_ids = (tok.token_to_id(eos_token),)
        return cls(tok, eos_ids, _token_text(cfg.get("bos_token")), eos_token, template,
                   add_bos_token=bool(cfg.get("add_bos_token", False)))


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def byte_tokenizer(eos_token_ids: tuple[int, ...] = (1,)) -> Tokenizer:
    """A byte-level tokenizer (ids 0 and 1 are <s> and </s>, then one id per byte): any text round-trips."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    for i, ch in enumerate(sorted(byte_chars)):
        vocab[ch] = i + 2
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok, eos_token_ids, "<s>", "</s>", CHATML_TEMPLATE)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas without splitting multi-byte characters.

    Decodes a small window (prefix_offset..) and emits only what extends past the already-read text; a
    trailing U+FFFD means an incomplete character, so the delta waits for the next token.
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    prefix_text: str = ""  # decode(ids[prefix_offset:read_offset]), kept so each token costs one decode

    @classmethod
    def start(cls, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool) -> "IncrementalDetokenizer":
        tail = list(prompt_ids[-5:])  # context for tokenizers that add a leading space to a word's first piece
        return cls(tokenizer, skip_special_tokens, tail, 0, len(tail), "", tokenizer.decode(tail, skip_special_tokens))

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) <= len(self.prefix_text) or full.endswith("\ufffd"):
            return ""
        delta = full[len(self.prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a sequence: emits what an incomplete character held back, as U+FFFD."""
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        delta = full[len(self.prefix_text):] if len(full) > len(self.prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.prefix_text = ""
        self.text += delta
        return delta
