"""SipIt end to end: exact recovery on real sentences and random tokens, round trips, policies."""

from __future__ import annotations

import pytest
import torch

import sipit
from sipit import lm as lm_mod
from sipit.invert import policies
from sipit.invert.sipit import Best, Search


def first_tokens(llama, text, n=12):
    return llama.encode(text)[:n]


@pytest.mark.parametrize("layer", ["0", "1", "2", "-1", "final"])
def test_exact_recovery_of_real_sentences(llama, wiki_prompts, layer):
    for text in wiki_prompts[:2]:
        ids = first_tokens(llama, text)
        result = sipit.invert(sipit.capture(llama, token_ids=ids, layer=layer), model=llama)
        assert result.token_ids == ids
        assert result.all_accepted


@pytest.mark.parametrize("layer", ["1", "3"])
def test_exact_recovery_of_random_tokens(llama, layer):
    ids = torch.randint(0, llama.vocab_size, (10,), generator=torch.Generator().manual_seed(3))
    ids = ids.tolist()
    result = sipit.invert(sipit.capture(llama, token_ids=ids, layer=layer), model=llama)
    assert result.token_ids == ids


def test_round_trip_through_the_file(llama, tmp_path):
    text = "The Eiffel Tower was completed in 1889."
    path = tmp_path / "states.safetensors"
    captured = sipit.capture(llama, text, layer=2, out=path)
    loaded = sipit.states.load(path) if hasattr(sipit, "states") else None
    from sipit import states as states_mod

    loaded = states_mod.load(path)
    assert torch.equal(loaded.states, captured.states)
    assert loaded.meta["layer"] == "2" and loaded.meta["model"] == "shakespeare-llama"
    assert "text" not in loaded.meta and "token_ids" not in loaded.meta
    result = sipit.invert(path)  # the model is found from the metadata
    assert result.text == text


@pytest.mark.parametrize("policy", ["random", "exhaustive", "gradient"])
def test_policies_agree_with_the_default(llama, wiki_prompts, policy):
    ids = first_tokens(llama, wiki_prompts[3], n=4)
    states = sipit.capture(llama, token_ids=ids, layer=1)
    reference = sipit.invert(states, model=llama)
    other = sipit.invert(states, model=llama, policy=policy)
    assert other.token_ids == reference.token_ids == ids
    assert other.policy == policy


def test_exhaustive_verifies_the_whole_vocabulary(llama):
    states = sipit.capture(llama, token_ids=[100, 200], layer=1)
    result = sipit.invert(states, model=llama, policy="exhaustive")
    assert [p.candidates for p in result.positions] == [llama.vocab_size] * 2
    assert all(p.margin is not None and p.margin > 0 for p in result.positions)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_default_policy_is_exact_in_half_precision(wiki_prompts, dtype):
    half = lm_mod.load("shakespeare-llama", dtype=dtype)
    for layer in ("1", "-1"):
        ids = first_tokens(half, wiki_prompts[5])
        states = sipit.capture(half, token_ids=ids, layer=layer)
        assert states.states.dtype == lm_mod.DTYPES[dtype]
        assert sipit.invert(states, model=half).token_ids == ids


def test_half_precision_proposals_use_an_fp32_guide(wiki_prompts):
    half = lm_mod.load("shakespeare-llama", dtype="bf16")
    ids = first_tokens(half, wiki_prompts[7])
    states = sipit.capture(half, token_ids=ids, layer=-1)
    policy = policies.make("probe", half, lm_mod.parse_layer(-1, half.n_layers))
    policy.prepare(states.states.float())

    assert policy.guide.dtype == torch.float32 and policy.guide.model is not half.model
    again = policies.make("probe", half, lm_mod.parse_layer(1, half.n_layers))
    again.prepare(states.states.float())
    assert again.guide is policy.guide  # one fp32 copy per loaded model
    assert next(half.model.parameters()).dtype == torch.bfloat16
    result = sipit.invert(states, model=half)
    assert result.token_ids == ids
    counts = sorted(p.candidates for p in result.positions)
    assert counts[len(counts) // 2] <= 4, counts


def test_checkpoint_resumes_where_it_stopped(llama, tmp_path):
    ids = [300, 301, 302, 303, 304, 305]
    states = sipit.capture(llama, token_ids=ids, layer=2)
    checkpoint = tmp_path / "run.json"

    class Interrupt(Exception):
        pass

    def stop_after_three(done, total):
        if done == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        sipit.invert(states, model=llama, checkpoint=checkpoint, progress=stop_after_three)
    seen = []
    result = sipit.invert(states, model=llama, checkpoint=checkpoint,
                          progress=lambda done, total: seen.append(done))
    assert result.token_ids == ids
    assert seen == [4, 5, 6]  # the first three positions came from the checkpoint


def test_wrong_token_is_rejected_by_the_acceptance_rule(llama):
    ids = [400, 401, 402]
    states = sipit.capture(llama, token_ids=ids, layer=2)
    search = Search(llama, 2, policies.make("probe", llama, 2), states.states.float(),
                    states.states.dtype)
    for token in ids[:2]:
        search.verifier.push(token)
    observed = states.states[2].float()
    distances = (search.verifier.states(torch.tensor([402, 403])) - observed).norm(dim=-1)
    tolerance = search.acceptance.tolerance(observed)
    assert distances[0] <= tolerance < distances[1]


def test_best_keeps_nearest_and_runner_up():
    best = Best()
    best.update(torch.tensor([5, 6, 7]), torch.tensor([0.3, 0.1, 0.2]))
    best.update(torch.tensor([8]), torch.tensor([0.15]))
    assert (best.token, best.count) == (6, 4)
    assert (best.distance, best.runner_up) == pytest.approx((0.1, 0.15))


def test_push_prefix_matches_pushing_one_token_at_a_time(llama):
    from sipit.invert.verify import Verifier

    ids, candidates = [10, 20, 30, 40, 50], torch.tensor([7, 8, 9])
    one_by_one, at_once = Verifier(llama, 2), Verifier(llama, 2)
    for token in ids:
        one_by_one.push(token)
    at_once.push_prefix(ids)
    assert at_once.prefix == ids
    torch.testing.assert_close(at_once.states(candidates), one_by_one.states(candidates),
                               rtol=1e-4, atol=1e-4)


def test_anchored_correction_moves_towards_the_true_embedding(llama, wiki_prompts):
    from sipit.invert import probe as probe_mod
    from sipit.invert.verify import Verifier

    fitted = probe_mod.load_or_fit(llama, 1)
    table = llama.model.get_input_embeddings().weight.detach().float()
    ids = first_tokens(llama, wiki_prompts[7], n=16)
    observed = lm_mod.states(llama, ids, 1).float()
    verifier, ranks = Verifier(llama, 1), []
    for t, token in enumerate(ids):
        anchor = int((table - table[token]).norm(dim=-1).argsort()[20])  # 20th nearest token
        anchor_state = verifier.states(torch.tensor([anchor]))[0]
        predicted = fitted.corrected(table[anchor], anchor_state, observed[t])
        order = (table - predicted).norm(dim=-1).argsort()
        ranks.append(int((order == token).nonzero()))
        verifier.push(token)
    assert sum(rank < 4 for rank in ranks) >= 0.75 * len(ids), ranks


def test_default_policy_verifies_few_candidates_on_real_text(llama, wiki_prompts):
    counts = []
    for text in wiki_prompts[8:10]:
        ids = llama.encode(text)
        result = sipit.invert(sipit.capture(llama, token_ids=ids, layer=1), model=llama)
        assert result.token_ids == ids
        counts += [p.candidates for p in result.positions]
    assert sorted(counts)[len(counts) // 2] <= 4
