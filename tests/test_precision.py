"""Tests of the precision feature: the mismatch meter, loss scaling, the perfectible filter."""

from __future__ import annotations

import pytest
import torch

from sipit import lm as lm_mod
from sipit.errors import SipitError
from sipit.precision import engines, tasks
from sipit.precision.mismatch import MismatchConfig, compare, measure, response_lengths, slope
from sipit.precision.rl import RLConfig, Run, build_policy, perfectible, scaled_step, token_weights


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on a busy 2-core machine, more threads thrash (10x slower decoding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(dtype=torch.float32) -> lm_mod.LM:
    lm = build_policy(seed=0)
    lm.model.to(dtype).eval()
    return lm_mod.wrap(lm.model, None, "tiny")


def test_meter_zero_when_sampler_and_trainer_are_the_same_computation():
    lm = tiny_lm(torch.bfloat16)
    prompts = tasks.SortTask(6).prompts(5, torch.Generator().manual_seed(0))
    responses, log_mu = engines.sample(lm, prompts, 9, torch.Generator().manual_seed(1))
    log_pi = engines.replay(lm, prompts, responses)
    mask = torch.ones_like(responses, dtype=torch.bool)
    report = compare(log_mu, log_pi, responses, mask)
    for key in ("kl", "k1", "k2", "k3", "dp_abs_mean", "seq_kl", "seq_slope_per_1k"):
        assert report[key] == 0.0, key


def test_meter_on_builtin_replay_is_zero_and_batch_bf16_is_above_fp32_floor():
    lm_bf16 = lm_mod.load("shakespeare-llama", "cpu", "bf16")
    same = measure(MismatchConfig(dtype="bf16", sequences=3, max_new_tokens=10, trainer="replay"),
                   lm=lm_bf16)
    assert same["kl"] == 0.0 and same["dp_max"] == 0.0 and same["tokens"] > 0
    floor = measure(MismatchConfig(dtype="fp32", sequences=6, max_new_tokens=32),
                    lm=lm_mod.load("shakespeare-llama", "cpu", "fp32"))
    bf16 = measure(MismatchConfig(dtype="bf16", sequences=6, max_new_tokens=32), lm=lm_bf16)
    assert bf16["kl"] > 100 * max(floor["kl"], 1e-12)
    assert bf16["dp_abs_mean"] > 10 * floor["dp_abs_mean"]


def test_teacher_forced_matches_sampler_in_fp32():
    lm = tiny_lm()
    prompts = tasks.SortTask(6).prompts(4, torch.Generator().manual_seed(0))
    responses, log_mu = engines.sample(lm, prompts, 7, torch.Generator().manual_seed(2))
    mask = torch.ones_like(responses, dtype=torch.bool)
    mask[0, 4:] = False  # a padded row
    with torch.no_grad():
        log_pi = engines.teacher_forced(lm, prompts, responses, mask, tasks.PAD)
    assert torch.allclose(log_pi[mask], log_mu[mask], atol=1e-5)


def test_compare_metrics_on_known_values():
    log_mu = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))  # (1, 2, 2)
    log_pi = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
    tokens = torch.tensor([[0, 1]])
    report = compare(log_mu, log_pi, tokens, torch.tensor([[True, True]]), cap=1.5)
    assert report["dp_min"] == pytest.approx(-0.25)
    assert report["k1"] == pytest.approx(torch.log(torch.tensor(2.0)).item() / 2)
    assert report["above_cap"] == 0.0
    assert report["seq_log_ratios"][0] == pytest.approx(-torch.log(torch.tensor(2.0)).item())


def test_slope_and_lengths():
    assert slope(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == pytest.approx(2)
    lengths = response_lengths(4, 100)
    assert lengths.tolist() == [25, 50, 75, 100]


def test_loss_scaling_skips_a_step_with_an_inf_gradient():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=400)
    before = [p.detach().clone() for p in model.parameters()]
    bad = model(torch.tensor([[float("inf"), 1.0, 1.0]])).sum()
    norm, skipped = scaled_step(scaler, optimizer, bad, clip=1.0)
    assert skipped and scaler.get_scale() == 512.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    good = model(torch.ones(1, 3)).sum()
    norm, skipped = scaled_step(scaler, optimizer, good, clip=1.0)
    assert not skipped and norm == pytest.approx(2.0)  # d/dW = (1, 1, 1), d/db = 1
    assert not torch.equal(before[0], model.weight)


def test_disabled_scaler_also_skips_non_finite_steps():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    weight = model.weight.detach().clone()
    _, skipped = scaled_step(scaler, optimizer, model(torch.tensor([[float("nan"), 1.0]])).sum(),
                             clip=1.0)
    assert skipped and torch.equal(weight, model.weight)


def test_perfectible_keeps_exactly_the_band():
    rates = torch.tensor([0.0, 0.1, 0.19, 0.2, 0.5, 0.8, 0.81, 1.0])
    keep = perfectible(rates, (0.2, 0.8))
    assert keep.tolist() == [False, False, False, True, True, True, False, False]


def test_token_weights_truncate_and_mask():
    cfg = RLConfig(tis_cap=2.0, mis_cap=10.0)
    log_mu = torch.zeros(2, 3)
    log_pi = torch.tensor([[1.5, 0.0, 0.0], [0.5, 0.5, 0.5]])  # row 1: sequence ratio e^1.5
    mask = torch.ones(2, 3, dtype=torch.bool)
    tis = token_weights("tis", log_pi, log_mu, mask, cfg)
    assert tis[0, 0] == 2.0 and tis[0, 1] == 1.0
    cfg.mis_cap = 4.0
    mis = token_weights("mis", log_pi, log_mu, mask, cfg)
    assert (mis == 0).all()  # both sequence ratios e^1.5 > 4
    assert token_weights("plain", log_pi, log_mu, mask, cfg).eq(1).all()


def test_sort_task_reward_and_mask():
    task = tasks.SortTask(3)
    prompts = torch.tensor([[3, 1, 2, tasks.EQUALS]] * 2)
    right = torch.tensor([[1, 2, 3, tasks.EOS], [1, 2, 3, 5]])
    assert task.reward(prompts, right).tolist() == [1.0, 0.0]
    mask = tasks.response_mask(torch.tensor([[1, tasks.EOS, 4, 4], [1, 2, 3, 4]]))
    assert mask.tolist() == [[True, True, False, False], [True] * 4]


@pytest.mark.parametrize("dtype,scale", [("fp16", 2.0**16), ("bf16", 1.0)])
def test_rl_step_logs_mismatch_and_loss_scale(dtype, scale):
    task = tasks.SortTask(5)
    prompts = task.prompts(4, torch.Generator().manual_seed(0))
    run = Run(RLConfig(dtype=dtype, prompts_per_step=2, group=3), build_policy(0), prompts)
    row = run.step()
    assert row["loss_scale"] == scale and not row["skipped"]
    assert row["kl"] > -1e-6 and 0 <= row["reward"] <= 1  # exact KL, up to fp32 rounding
    assert next(run.master.model.parameters()).dtype == torch.float32  # fp32 master weights
    assert next(run.sampler.model.parameters()).dtype == lm_mod.resolve_dtype(dtype)


def test_bad_inputs_raise_sipit_error():
    with pytest.raises(SipitError):
        Run(RLConfig(variant="nope"), build_policy(0), tasks.SortTask(3).prompts(
            2, torch.Generator()))
    with pytest.raises(SipitError):
        measure(MismatchConfig(trainer="nope"))


def test_cli_mismatch_replay_reports_zero():
    import json

    from typer.testing import CliRunner

    from sipit.cli import app

    result = CliRunner().invoke(app, ["precision", "mismatch", "--dtype", "fp16", "--sequences",
                                      "2", "--max-new", "6", "--trainer", "replay", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["kl"] == 0.0 and report["dtype"] == "fp16"


@pytest.mark.slow
def test_rl_run_gains_reward(tmp_path):
    from sipit.precision.rl import train

    result = train(RLConfig(dtype="fp16", steps=60, eval_every=60, out=str(tmp_path)))
    assert result["evals"][-1]["solve_rate"] > result["evals"][0]["solve_rate"] + 0.15
    assert (tmp_path / "rl_fp16_plain.json").is_file()
