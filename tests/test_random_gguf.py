"""bench/random_gguf.py: a random-weight GGUF of a named shape loads as that shape, with a tokenizer."""

import numpy as np

from bench import random_gguf
from models.gguf_tokenizer import tokenizer_from_gguf
from models.weights import load_weights


def test_small_shape_loads_with_its_vocabulary(monkeypatch, smollm2_path, tmp_path):
    shape = random_gguf.Shape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=49200, tied=False)
    monkeypatch.setitem(random_gguf.SHAPES, "small", shape)
    out = random_gguf.write("small", "Q8_0", tmp_path / "m.gguf", smollm2_path)
    w = load_weights(gguf_file=out)
    c = w.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size) == (64, 2, 4, 2, 49200)
    assert not c.tied_embeddings and c.rope_freq_factors is not None
    assert np.asarray(w.tensors["blk.1.ffn_down.weight"]).shape == (64, 96)
    tok, _ = tokenizer_from_gguf(out)
    assert tok.get_vocab_size() == 49200
    assert tok.decode(tok.encode("The capital of France").ids) == "The capital of France"
