import pytest

from remp.detokenizer import IncrementalDetokenizer
from remp.model.reader import open_checkpoint

TEXTS = [
    "Un café très naïve à Zürich, déjà vu.",
    "日本語のテキストです。東京タワー",
    "Party 🎉👍🏽 time 🇫🇷 ok 😀!",
    "Mixed: Ωmega → ∞, Привет мир, 한국어 and emoji 🚀 end",
]


@pytest.fixture(scope="module")
def tok():
    return open_checkpoint(None).load_tokenizer()  # the bundled SmolLM2's


@pytest.fixture(scope="module")
def prompt(tok):
    return tok.apply_chat_template(
        [{"role": "user", "content": "Say something."}], add_generation_prompt=True, tokenize=False
    )


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _stream(tok, prompt_ids, ids, **kw):
    """Feed ids one by one; return (detok, streamed chunks, stop string or None)."""
    d = IncrementalDetokenizer(tok, prompt_ids, **kw)
    chunks, stopped, streamed = [], None, []
    for t in ids:
        stopped = d.add_token(t)
        chunks.append(d.new_text())
        streamed.append("".join(chunks))
        if stopped:
            break
    chunks.append(d.flush())
    # Everything streamed at any point is a prefix of the final output (nothing sent is ever taken back).
    final = "".join(chunks)
    assert final == d.text
    for sent in streamed:
        assert final.startswith(sent), (sent, final)
    return d, chunks, stopped


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("with_prompt", [True, False])
def test_multibyte_stream_matches_decode(tok, prompt, text, with_prompt):
    ids = _ids(tok, text)
    splits = any("\ufffd" in tok.decode([i]) for i in ids)  # some token ends mid-character
    assert splits or text == TEXTS[0]  # the accented Latin text happens to tokenize whole chars
    prompt_ids = _ids(tok, prompt) if with_prompt else []
    d, chunks, stopped = _stream(tok, prompt_ids, ids)
    assert stopped is None
    assert "".join(chunks) == tok.decode(ids) == d.text == text
    assert not any("\ufffd" in c for c in chunks)
    if splits:
        assert "" in chunks[:-1]  # held back while a character was incomplete


def test_special_tokens(tok):
    ids = _ids(tok, "Hi é") + [tok.eos_token_id]
    _, chunks, _ = _stream(tok, [], ids)
    assert "".join(chunks) == "Hi é"
    _, chunks, _ = _stream(tok, [], ids, skip_special_tokens=False)
    assert "".join(chunks) == "Hi é" + tok.eos_token


def test_flush_emits_incomplete_bytes_like_decode(tok):
    ids = _ids(tok, "a 🎉")[:-1]  # cut inside the emoji
    d, chunks, _ = _stream(tok, [], ids)
    assert "".join(chunks) == tok.decode(ids) == d.text
    assert chunks[-1].endswith("\ufffd")


TEXT = "Hello world. The answer is 42, 日本語 says the guide. Goodbye!"


def _check_stop(tok, stop, include, expect_text, expect_stop):
    ids = _ids(tok, TEXT)
    d, chunks, stopped = _stream(tok, [], ids, stop=stop, include_stop_str_in_output=include)
    assert stopped == expect_stop == d.stop_reason
    assert d.text == expect_text
    assert "".join(chunks) == expect_text
    return ids, chunks


@pytest.mark.parametrize("include", [False, True])
def test_stop_single_token(tok, include):
    _check_stop(tok, ["answer"], include, "Hello world. The answer" if include else "Hello world. The ", "answer")


@pytest.mark.parametrize("include", [False, True])
def test_stop_spanning_tokens_and_mid_token(tok, include):
    toks = tok.convert_ids_to_tokens(_ids(tok, TEXT))
    assert "Hello" in toks and "Ġworld" in toks  # "lo wor" spans two tokens, ends mid-token
    _check_stop(tok, ["lo wor"], include, "Hello wor" if include else "Hel", "lo wor")


@pytest.mark.parametrize("include", [False, True])
def test_stop_multibyte(tok, include):
    _check_stop(tok, ["本語"], include, TEXT[: TEXT.index("本語") + (2 if include else 0)], "本語")


def test_earliest_stop_wins_and_no_match(tok):
    _check_stop(tok, ["Goodbye", "42", "guide"], False, "Hello world. The answer is ", "42")
    _check_stop(tok, ["nope", "also not"], False, TEXT, None)


def test_streamed_text_never_contains_stop_prefix(tok):
    # Each stop string completes several tokens after its first characters were decoded.
    for stop in ["The answer is 42", "world. The", "says the guide. Good", "42, 日本"]:
        start = TEXT.index(stop)
        d = IncrementalDetokenizer(tok, [], stop=[stop])
        streamed = ""
        for t in _ids(tok, TEXT):
            if d.add_token(t):
                break
            streamed += d.new_text()
            assert len(streamed) <= start and TEXT.startswith(streamed)
        assert d.stop_reason == stop
        assert len(streamed) >= start - len(stop)  # held back no more than needed
        assert streamed + d.new_text() == d.text == TEXT[:start]


def test_add_after_stop_raises(tok):
    d = IncrementalDetokenizer(tok, [], stop=["Hello"])
    assert d.add_token(_ids(tok, "Hello")[0]) == "Hello"
    assert d.text == "" and d.new_text() == ""
    with pytest.raises(RuntimeError):
        d.add_token(5)


def test_decode_window_stays_small(tok, monkeypatch):
    # vLLM-style offsets: each step decodes a few tokens, not the whole output.
    sizes = []
    real = tok.convert_tokens_to_string
    monkeypatch.setattr(tok, "convert_tokens_to_string", lambda ts: sizes.append(len(ts)) or real(ts))
    text = " ".join(TEXTS) * 5
    ids = _ids(tok, text)
    _, chunks, _ = _stream(tok, _ids(tok, "prompt " * 20), ids, stop=["never appears"])
    assert "".join(chunks) == text
    assert len(ids) > 200 and max(sizes) <= 12


def test_stop_strings_ignored_before_min_tokens(tok):
    ids = _ids(tok, TEXT)
    n_before = len(_ids(tok, "Hello world. The answer"))
    # "Hello" completes at token 1 < min_tokens: ignored; "answer" comes later and stops.
    d = IncrementalDetokenizer(tok, [], stop=["Hello", "answer"], min_tokens=3)
    stopped = None
    for t in ids:
        if stopped := d.add_token(t):
            break
    assert stopped == "answer" and len(d.token_ids) == n_before and d.text == "Hello world. The "
