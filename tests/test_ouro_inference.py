"""Ouro inference: KV cache strategies, Q-exit, generation, layer naming, capture and inversion."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import sipit
from sipit import lm as lm_mod
from sipit.errors import SipitError
from test_ouro import VOCAB, tiny


@torch.no_grad()
def decode_logits(model, ids: torch.Tensor, prefix: int, **options) -> torch.Tensor:
    """Logits at positions prefix-1.. from a prefill of `prefix` tokens, then token by token."""
    cache = DynamicCache(config=model.config)
    out = [model(ids[:, :prefix], cache=cache, use_cache=True, **options).logits[:, -1]]
    for t in range(prefix, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], cache=cache, use_cache=True, **options).logits[:, -1])
    return torch.stack(out, 1)  # (B, S - prefix + 1, V)


@torch.no_grad()
def test_full_cache_decoding_equals_full_recompute():
    model = tiny(steps=3)
    ids = torch.randint(0, VOCAB, (2, 10))
    want = model(ids).logits[:, 3:]
    torch.testing.assert_close(decode_logits(model, ids, 4), want, atol=1e-5, rtol=1e-4)
    cache = DynamicCache(config=model.config)
    model(ids, cache=cache, use_cache=True)
    assert len(cache.layers) == 3 * 2  # slot = loop * L + layer


@torch.no_grad()
def test_last_step_cache_equals_full_recompute_for_one_step_and_is_smaller():
    model = tiny(steps=1)
    ids = torch.randint(0, VOCAB, (2, 10))
    got = decode_logits(model, ids, 4, cache_strategy="last-step")
    torch.testing.assert_close(got, model(ids).logits[:, 3:], atol=1e-5, rtol=1e-4)

    looped = tiny(steps=3)
    cache = DynamicCache(config=looped.config)
    looped(ids, cache=cache, use_cache=True, cache_strategy="last-step")
    assert sum(layer.get_seq_length() > 0 for layer in cache.layers) == 2  # L slots, not T * L
    # prefill logits are exact; later tokens attend to the last step's keys of earlier tokens
    last = decode_logits(looped, ids, 4, cache_strategy="last-step")
    full = looped(ids).logits[:, 3:]
    torch.testing.assert_close(last[:, 0], full[:, 0], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(last).all() and not torch.allclose(last[:, 1:], full[:, 1:])


def count_block_calls(model) -> list[int]:
    calls = [0]

    def hook(module, args, output):
        calls[0] += args[0].shape[0]  # one per running row

    model.model.layers[0].register_forward_hook(hook)
    return calls


@torch.no_grad()
def test_q_exit_skips_the_remaining_steps_of_a_decoded_token():
    model = tiny(steps=4)
    ids = torch.randint(0, VOCAB, (4, 8))
    never = decode_logits(model, ids, 5, exit_threshold=1.0)
    torch.testing.assert_close(never, model(ids).logits[:, 4:], atol=1e-5, rtol=1e-4)

    with torch.no_grad():
        model.model.early_exit_gate.weight.zero_()
        model.model.early_exit_gate.bias.copy_(torch.tensor([-0.1]))  # lambda just under 1/2
    calls = count_block_calls(model)
    cache = DynamicCache(config=model.config)
    model(ids[:, :5], cache=cache, use_cache=True)
    calls[0] = 0
    out = model(ids[:, 5:6], cache=cache, use_cache=True, exit_threshold=0.7)
    # CDF after steps 1, 2 = 0.475, 0.72: every token leaves at step 2 and steps 3-4 never run
    assert torch.all(out.exit_steps == 2) and calls[0] == 4 * 2
    assert out.loop_logits is None  # the head ran once, at the exit
    torch.testing.assert_close(out.logits, model.lm_head(out.loop_hidden_states[1]))
    assert all(layer.get_seq_length() == 6 for layer in cache.layers)  # skipped slots filled
    nxt = model(ids[:, 6:7], cache=cache, use_cache=True)
    assert torch.isfinite(nxt.logits).all()


@torch.no_grad()
@pytest.mark.parametrize("strategy", ["full", "last-step"])
def test_left_padded_batched_generation_equals_unbatched(strategy):
    model = tiny(steps=3)
    model.generation_config.pad_token_id = 0
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (7, 4, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             cache_strategy=strategy)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=6, do_sample=False,
                               cache_strategy=strategy)
        assert batched[row, width:].tolist() == alone[0, len(p):].tolist()


@torch.no_grad()
def test_generation_with_full_cache_equals_greedy_recompute():
    model = tiny(steps=3)
    ids = torch.randint(0, VOCAB, (1, 5))
    got = model.generate(ids, max_new_tokens=6, do_sample=False)
    seq = ids
    for _ in range(6):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert got.tolist() == seq.tolist()


def wrapped(steps: int = 3) -> lm_mod.LM:
    return lm_mod.wrap(tiny(steps=steps), tokenizer=None, name="tiny-ouro")


@torch.no_grad()
def test_loop_layer_names_address_each_loop_step():
    lm = wrapped()
    model = lm.model
    assert lm.n_loops == 3 and lm.n_layers == 2
    ids = torch.randint(0, VOCAB, (2, 6))
    out = model(ids)
    pre_norm = {}

    def keep(module, args, output, calls=[0]):  # noqa: B006  (counts calls of the last block)
        calls[0] += 1
        pre_norm[calls[0]] = output

    handle = model.model.layers[1].register_forward_hook(keep)
    model(ids)
    handle.remove()

    def at(spec):
        return lm_mod.forward_to(lm, lm_mod.parse_layer(spec, lm.n_layers, lm.n_loops), ids)

    torch.testing.assert_close(at("0"), model.model.embed_tokens(ids))
    torch.testing.assert_close(at("1.0"), model.model.embed_tokens(ids))
    for u in (1, 2, 3):
        torch.testing.assert_close(at(f"{u}.final"), out.loop_hidden_states[u - 1])
        torch.testing.assert_close(at(f"{u}.2"), pre_norm[u])
        torch.testing.assert_close(at(f"{u}.-1"), pre_norm[u])
    torch.testing.assert_close(at("2.0"), out.loop_hidden_states[0])
    torch.testing.assert_close(at("-1"), pre_norm[3])  # plain names mean the last loop step
    torch.testing.assert_close(at("final"), out.loop_hidden_states[2])
    assert lm_mod.parse_layer("2.-1", 2, 3) == "2.2"


@pytest.mark.parametrize("spec", ["4.1", "0.1", "2.7", "a.1", "1.2.3"])
def test_bad_loop_layer_names_are_refused(spec):
    with pytest.raises(SipitError):
        lm_mod.parse_layer(spec, 2, 3)


@torch.no_grad()
def test_cached_forward_to_a_loop_layer_matches_a_full_forward():
    lm = wrapped()
    ids = torch.randint(0, VOCAB, (1, 6))
    layer = lm_mod.parse_layer("2.1", lm.n_layers, lm.n_loops)
    want = lm_mod.forward_to(lm, layer, ids)[0, -1]
    cache = lm_mod.new_cache(lm)
    lm_mod.forward_to(lm, layer, ids[:, :5], cache=cache)
    grown = lm_mod.expand_cache(cache, 3)
    got = lm_mod.forward_to(lm, layer, ids[:, 5:].repeat(3, 1), cache=grown,
                            position_ids=torch.full((3, 1), 5))
    torch.testing.assert_close(got[:, -1], want.expand(3, -1), atol=1e-5, rtol=1e-4)


class _Tok:
    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("spec", ["1.2", "2.1", "3.final"])
def test_sipit_inverts_a_tiny_looped_model_from_any_loop_step(spec):
    lm = lm_mod.wrap(tiny(steps=3, seed=3), tokenizer=_Tok(), name="tiny-ouro")
    ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    states = sipit.capture(lm, token_ids=ids, layer=spec)
    result = sipit.invert(states, model=lm, policy="exhaustive")
    assert result.token_ids == ids and result.all_accepted


@torch.no_grad()
def test_audit_collects_plain_layer_names_at_the_last_loop_step():
    from sipit.audit import collect

    lm = wrapped()
    ids = torch.randint(0, VOCAB, (2, 6))
    layers = collect.parse_layers("1,2,final", lm.n_layers)
    got = collect.forward_layers(lm, layers, ids, pick=lambda h: h)
    for layer in (1, 2, lm_mod.FINAL):
        torch.testing.assert_close(got[layer], lm_mod.forward_to(lm, layer, ids))
    torch.testing.assert_close(got[lm_mod.FINAL], lm.model(ids).loop_hidden_states[-1])


@torch.no_grad()
def test_audit_collects_every_loop_step_in_one_forward():
    from sipit.audit import collect

    lm = wrapped()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    layers = collect.parse_layers("all", lm.n_layers, lm.n_loops)
    assert len(layers) == lm.n_loops * (lm.n_layers + 1)
    got = collect.forward_layers(lm, layers, ids, pick=lambda h: h)
    for layer in layers:
        torch.testing.assert_close(got[layer], lm_mod.forward_to(lm, layer, ids))
    assert not torch.allclose(got["1.1"], got["2.1"])
    assert collect.parse_layers("2.final,1.1,final", lm.n_layers, lm.n_loops) == [
        "1.1", "2.final", lm_mod.FINAL]
