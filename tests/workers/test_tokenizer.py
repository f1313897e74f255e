import random

import pytest

from partita.workers.tokenizer import IncrementalDetokenizer, byte_tokenizer


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    for text in ["hello", "héllo wörld 日本語 🎵", "a\nb\tc", ""]:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("trial", range(5))
def test_incremental_deltas_add_up_to_the_full_decode(trial):
    tok = byte_tokenizer()
    rng = random.Random()
    text = "".join(rng.choice(["a", "é", "日", "🎵", " ", "z"]) for _ in range(30))
    ids = tok.encode(text)
    prompt = tok.encode("prompt: ")
    detok = IncrementalDetokenizer.start(tok, prompt, True)
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)


def test_chat_template_renders_messages():
    tok = byte_tokenizer()
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
