"""The GGUF reader's cache (tensor table, metadata, converted tokenizer) gives exactly what parsing the file
with `gguf` and converting the tokenizer with transformers give; an entry follows its file; remp works where
it cannot write the cache."""

import gguf
import numpy as np
import pytest
import torch

from remp.model.file_cache import cached_dir, cached_json, entry_dir
from remp.model.gguf_reader import GGUFReader
from remp.model.reader import default_model_path

TEXTS = ["Hello wörld, 日本語!", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "  def f(x):\n\treturn x"]
CHAT = [{"role": "user", "content": "Name three primes."}]


@pytest.fixture(scope="module")
def direct():
    from transformers import AutoTokenizer

    path = default_model_path()
    return gguf.GGUFReader(str(path)), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_cached_reader_equals_direct_parse(direct):
    """Through the default cache (built by whichever test opened the model first; by the first reader here
    otherwise): the second reader certainly reads the cached entry."""
    ref_file, ref_tok = direct
    first, second = GGUFReader(default_model_path()), GGUFReader(default_model_path())
    assert (entry_dir(default_model_path()) / "gguf_index.json").is_file()
    assert first.config == second.config and second.config.vocab_size == 49152
    for t in ref_file.tensors[:: max(1, len(ref_file.tensors) // 12)] + ref_file.tensors[-2:]:
        want = gguf.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        assert np.array_equal(second._dequantize(t.name), want), t.name
    assert torch.equal(
        second.read("model.embed_tokens.weight", (slice(5, 9),)), first.read("model.embed_tokens.weight")[5:9]
    )
    tok = second.load_tokenizer()
    for text in TEXTS:
        assert tok.encode(text) == ref_tok.encode(text)
        assert tok.decode(tok.encode(text)) == ref_tok.decode(ref_tok.encode(text))
    assert (tok.eos_token_id, tok.bos_token_id, tok.all_special_ids) == (
        ref_tok.eos_token_id,
        ref_tok.bos_token_id,
        ref_tok.all_special_ids,
    )
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == ref_tok.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )


def test_unwritable_cache_still_works(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file where the cache directory would be")
    monkeypatch.setenv("REMP_CACHE_DIR", str(tmp_path / "file"))
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")
    calls = []
    assert cached_json(source, "index.json", lambda: calls.append(1) or {"a": 1}) == {"a": 1}
    assert cached_json(source, "index.json", lambda: calls.append(1) or {"a": 1}) == {"a": 1}
    assert len(calls) == 2  # rebuilt each time, no error
    assert cached_dir(source, "tok", lambda d: (d / "x").write_text("y")) is None


def test_cache_entry_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("REMP_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")
    assert cached_json(source, "index.json", lambda: {"v": 1}) == {"v": 1}
    assert cached_json(source, "index.json", lambda: {"v": 2}) == {"v": 1}  # cached
    source.write_bytes(b"other weights")  # a changed file is a new entry
    assert cached_json(source, "index.json", lambda: {"v": 3}) == {"v": 3}
    made = cached_dir(source, "tok", lambda d: (d / "x").write_text("y"))
    assert (made / "x").read_text() == "y" and cached_dir(source, "tok", lambda d: 1 / 0) == made
