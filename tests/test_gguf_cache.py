"""The GGUF reader's cache (tensor table, metadata, converted tokenizer) gives exactly what parsing the file
with `gguf` and converting the tokenizer with transformers give, and remp works where it cannot write it."""

import gguf
import numpy as np
import pytest
import torch

from remp.model.gguf_reader import GGUFReader
from remp.model.reader import default_model_path

TEXTS = ["Hello wörld, 日本語!", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "  def f(x):\n\treturn x"]
CHAT = [{"role": "user", "content": "Name three primes."}]


@pytest.fixture(scope="module")
def direct():
    from transformers import AutoTokenizer

    path = default_model_path()
    return gguf.GGUFReader(str(path)), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("writable", [True, False])
def test_cached_reader_equals_direct_parse(direct, tmp_path, monkeypatch, writable):
    ref_file, ref_tok = direct
    if not writable:
        (tmp_path / "ro").write_text("a file where the cache directory would be")
    monkeypatch.setenv("REMP_CACHE_DIR", str(tmp_path / "ro" if not writable else tmp_path))
    first, second = GGUFReader(default_model_path()), GGUFReader(default_model_path())
    assert any(tmp_path.iterdir()) if writable else not (tmp_path / "ro").is_dir()
    assert first.config == second.config and first.config.vocab_size == 49152
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
