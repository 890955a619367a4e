"""Tests of the collision audit: blocked scan vs direct, collisions found, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sipit import lm as lm_mod
from sipit.audit import continuations, margins, pairs, report
from sipit.audit.scan import PairScan
from sipit.errors import SipitError
from sipit.models import builtin


@pytest.fixture(scope="module")
def shakespeare():
    return lm_mod.load("shakespeare-llama")


@pytest.fixture(scope="module")
def twin_rows():
    """A tiny random Llama whose tokens 5 and 7 have identical embedding rows."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[7] = emb[5]
    tokenizer = AutoTokenizer.from_pretrained(builtin.path_of(builtin.DEFAULT))
    return lm_mod.wrap(model, tokenizer, "twin-rows")


def test_blocked_scan_equals_direct():
    torch.manual_seed(1)
    x = torch.randn(600, 24) * 2 + 30  # large common offset: the expanded norm is fragile here
    x[10] = x[400]  # an exact duplicate
    x[20] = x[500] + 1e-4  # a near pair, far below GEMM resolution at this scale
    scan = PairScan(x, threshold=1e-6, k=5, block=64, tile=128)
    got = scan.run()

    d = torch.cdist(x.double(), x.double())
    iu = torch.triu_indices(600, 600, 1)
    flat = d[iu[0], iu[1]]
    order = flat.argsort()[:5]
    assert got["pairs"] == len(flat)
    assert got["under_threshold"] == int((flat < 1e-6).sum()) == 1
    assert [[p["i"], p["j"]] for p in got["closest"]] == iu[:, order].T.tolist()
    for pair, want in zip(got["closest"], flat[order].tolist(), strict=True):
        assert pair["distance"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got["min_distance"] == 0.0
    assert got["percentiles"]["p50"] == pytest.approx(float(flat.median()), rel=0.02)

    groups = [i % 5 for i in range(600)]
    nearest = (d + torch.eye(600) * 1e9).min(1).values
    want = {g: float(nearest[torch.tensor(groups) == g].min()) for g in range(5)}
    got_groups = scan.group_minima(groups)
    for g in range(5):
        assert got_groups[g] == pytest.approx(want[g], rel=1e-9, abs=1e-12)


def test_identical_embedding_rows_are_reported(twin_rows):
    prompts = [[1, 2, 5], [1, 2, 7], [3, 4, 5], [9, 9], [8], [1, 2, 6]]
    result = pairs.audit_pairs(twin_rows, prompts, layers="1,2,final", k=3)
    for layer in result.layers:
        top = layer["closest"][0]
        assert (top["i"], top["j"]) == (0, 1)
        assert top["distance"] < 1e-6
        assert layer["under_threshold"] >= 1
        assert layer["collisions"][0]["ids_j"] == [1, 2, 7]
    assert result.collisions >= 3


def test_continuations_find_twin_tokens(twin_rows):
    result = continuations.audit_continuations(twin_rows, [[1, 2]], layers="2", candidates=16)
    layer = result.layers[0]
    assert layer["pairs"] == 16 * 15 // 2
    assert layer["under_threshold"] == 1
    assert (layer["collisions"][0]["i"], layer["collisions"][0]["j"]) == (5, 7)


def test_margin_is_zero_for_twin_token(twin_rows):
    result = margins.audit_margins(twin_rows, [[1, 5]], layers="1")
    last = result.rows[-1]
    assert last["rival_id"] == 7 and last["margin"] < 1e-6
    assert not last["safe_fp32"]


def test_repeated_token_is_a_near_collision_without_bos(shakespeare):
    prompts = [[199], [199, 199], [52, 33, 26], [304, 1698]]
    plain = pairs.audit_pairs(shakespeare, prompts, layers="1,final")
    assert all(layer["under_floor"] == 1 for layer in plain.layers)
    near = plain.layers[0]["near_collisions"][0]
    assert (near["ids_i"], near["ids_j"]) == ([199], [199, 199])

    with_bos = pairs.audit_pairs(shakespeare, prompts, layers="1,final", bos=True)
    assert with_bos.near_collisions == 0 and with_bos.collisions == 0
    assert min(layer["min_distance"] for layer in with_bos.layers) > 1e-2


class Interrupted(Exception):
    pass


def test_resume_after_interruption_gives_same_report(shakespeare, tmp_path):
    prompts = pairs.paper_prompts(shakespeare, 300, seed=3)
    kwargs = dict(layers="2,final", block=64, tile=128, k=5)
    straight = pairs.audit_pairs(shakespeare, prompts, **kwargs).to_dict()

    calls = []

    def stop_soon(done, total, label):
        calls.append(label)
        if label.startswith("layer") and len(calls) > 30:
            raise Interrupted

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        pairs.audit_pairs(shakespeare, prompts, checkpoint=ckpt, save_every=0.0,
                          progress=stop_soon, **kwargs)
    assert (ckpt / "scan.safetensors").is_file()
    resumed = pairs.audit_pairs(shakespeare, prompts, checkpoint=ckpt, **kwargs).to_dict()
    for result in (straight, resumed):
        result.pop("seconds")
        result.pop("pairs_per_second")
    assert resumed == straight

    with pytest.raises(SipitError, match="other prompts"):
        pairs.audit_pairs(shakespeare, prompts[:-1], checkpoint=ckpt, **kwargs)


def test_bad_input(shakespeare, tmp_path):
    with pytest.raises(SipitError, match="not found"):
        pairs.read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SipitError, match="no prompts"):
        pairs.read_prompts(empty)
    with pytest.raises(SipitError, match="out of range"):
        pairs.audit_pairs(shakespeare, ["a b", "c d"], layers="9")
    with pytest.raises(SipitError, match="distinct"):
        pairs.audit_pairs(shakespeare, ["same", "same"])


def test_reports_and_plots(shakespeare, tmp_path):
    result = pairs.audit_pairs(shakespeare, pairs.paper_prompts(shakespeare, 80), layers="1,2")
    paths = report.save(tmp_path, "pairs", result.to_dict())
    names = {p.name for p in paths}
    assert {"audit_pairs.json", "audit_pairs.md", "audit_distances.png",
            "audit_min_by_layer.png", "audit_min_by_length.png"} <= names
    data = json.loads((tmp_path / "audit_pairs.json").read_text())
    assert data["n_prompts"] == result.n_prompts and len(data["layers"]) == 2
    assert "| 1 |" in (tmp_path / "audit_pairs.md").read_text()

    marg = margins.audit_margins(shakespeare, ["To be"], layers="1,final")
    assert all(row["margin"] > 0 for row in marg.rows)
    paths = report.save(tmp_path, "margins", marg.to_dict())
    assert (tmp_path / "audit_margins.png").stat().st_size > 1000


def test_cli_pairs_and_errors(tmp_path):
    from typer.testing import CliRunner

    from sipit.cli import app

    file = tmp_path / "prompts.txt"
    file.write_text("To be, or not to be\nFirst Citizen:\nO Romeo, Romeo\n")
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "pairs", "--prompts", str(file), "--layers", "1,final",
                             "--out", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "audit_pairs.json").is_file()
    assert not (tmp_path / "out" / "checkpoint").exists()

    bad = runner.invoke(app, ["audit", "pairs", "--prompts", str(tmp_path / "nope.txt")])
    assert isinstance(bad.exception, SipitError)


def test_audit_pairs_blocking_does_not_change_the_report(shakespeare):
    prompts = pairs.paper_prompts(shakespeare, 200, seed=5)
    small = pairs.audit_pairs(shakespeare, prompts, layers="1,final", block=16, tile=48)
    big = pairs.audit_pairs(shakespeare, prompts, layers="1,final")
    for a, b in zip(small.layers, big.layers, strict=True):
        assert a["pairs"] == b["pairs"] == small.n_prompts * (small.n_prompts - 1) // 2
        assert a["min_distance"] == b["min_distance"]
        assert [(p["i"], p["j"]) for p in a["closest"]] == [(p["i"], p["j"]) for p in b["closest"]]
        assert a["histogram"]["counts"] == b["histogram"]["counts"]
        assert a["under_floor"] == b["under_floor"]


def test_cli_exit_status_of_a_near_collision_and_bad_settings(tmp_path):
    from test_cli import assert_one_line_error, sipit_cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text('{"ids": [199]}\n{"ids": [199, 199]}\n{"ids": [5, 6, 7]}\n')
    prompts = prompts.rename(tmp_path / "prompts.jsonl")
    proc = sipit_cli("audit", "pairs", "--prompts", str(prompts), "--layers", "1",
                     "--out", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr  # "\n" vs "\n\n" without BOS: a near-collision

    base = ("audit", "pairs", "--prompts", str(prompts), "--layers", "1")
    assert_one_line_error(sipit_cli(*base, "--threshold", "nan"), "threshold")
    assert_one_line_error(sipit_cli(*base, "--out", str(prompts)), "is a file")
    proc = sipit_cli("audit", "continuations", "--from-pairs", str(prompts), "--out",
                     str(tmp_path / "c"))
    assert_one_line_error(proc, "not a pairs report")
