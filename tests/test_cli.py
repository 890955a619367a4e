"""The CLI end to end, and a one-line error with a non-zero exit for every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import sipit
from sipit import states as states_mod


def sipit_cli(*args, cwd=None):
    """Run the CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-c", "from sipit.cli import run; run()", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(proc, pattern):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert pattern in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def states_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "states.safetensors"
    proc = sipit_cli("capture", "--text", "Thou art more lovely", "--layer", "2", "-o", str(path))
    assert proc.returncode == 0, proc.stderr
    return path


def test_capture_then_invert_json(states_file):
    proc = sipit_cli("invert", str(states_file), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["text"] == "Thou art more lovely"
    assert len(result["token_ids"]) == len(result["positions"])
    assert not states_file.with_suffix(".invert.json").exists()  # checkpoint removed when done


def test_missing_file():
    assert_one_line_error(sipit_cli("invert", "no-such-file.safetensors"), "not found")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    assert_one_line_error(sipit_cli("invert", str(path)), "safetensors")


def test_file_without_provenance(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"states": torch.zeros(3, 192)}, str(path))
    assert_one_line_error(sipit_cli("invert", str(path)), "provenance")


def test_nan_in_states(states_file, tmp_path):
    states = states_mod.load(states_file)
    states.states[1, 7] = float("nan")
    path = tmp_path / "nan.safetensors"
    from safetensors.torch import save_file

    save_file({"states": states.states}, str(path), metadata=states.meta)
    assert_one_line_error(sipit_cli("invert", str(path)), "nan")


def test_states_from_another_model(states_file, other_model_dir):
    proc = sipit_cli("invert", str(states_file), "--model", str(other_model_dir))
    assert_one_line_error(proc, "width")


def test_states_from_other_weights(states_file, tmp_path, llama):
    states = states_mod.load(states_file)
    states.meta["weights_hash"] = states.meta["weights_hash_bf16"] = "0" * 16
    path = states_mod.save(tmp_path / "other.safetensors", states)
    assert_one_line_error(sipit_cli("invert", str(path)), "weights")


def test_same_weights_rounded_to_bf16_are_not_other_weights(states_file):
    proc = sipit_cli("invert", str(states_file), "--dtype", "bf16", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == "Thou art more lovely"


def test_states_that_match_no_candidate_exit_1(states_file, tmp_path):
    states = states_mod.load(states_file)
    states.meta["layer"] = "3"  # states of layer 2 labelled as layer 3
    path = states_mod.save(tmp_path / "relabelled.safetensors", states)
    proc = sipit_cli("invert", str(path), "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["all_accepted"] is False
    assert "not recovered" in proc.stderr


def test_interrupted_invert_exits_130_and_resumes(tmp_path):
    import signal
    import time

    path = tmp_path / "long.safetensors"
    text = "To be, or not to be, that is the question. " * 6
    assert sipit_cli("capture", "--text", text, "--layer", "1", "-o", str(path)).returncode == 0
    # a shell's background jobs inherit an ignored SIGINT; the child must see Ctrl-C as a user's
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen([sys.executable, "-c", "from sipit.cli import run; run()", "invert",
                             str(path), "--policy", "exhaustive"], preexec_fn=restore,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = path.with_suffix(".invert.json")
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    done = len(json.loads(checkpoint.read_text())["positions"])
    assert done >= 1

    proc = sipit_cli("invert", str(path), "--policy", "exhaustive", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == text
    assert not checkpoint.exists()


def test_markup_in_a_path_is_printed_as_text(tmp_path):
    proc = sipit_cli("invert", str(tmp_path / "x[red]y[/red].safetensors"))
    assert_one_line_error(proc, "x[red]y[/red]")


def test_a_folder_is_not_a_file(tmp_path):
    assert_one_line_error(sipit_cli("invert", str(tmp_path)), "folder")
    proc = sipit_cli("capture", "--text", "Hello", "-o", str(tmp_path))
    assert_one_line_error(proc, "folder")
    proc = sipit_cli("capture", "--text", "Hello", "--model", str(tmp_path), "-o", "x")
    assert_one_line_error(proc, "cannot load model")


def test_damaged_checkpoint_is_named(states_file, tmp_path):
    checkpoint = tmp_path / "ck.json"
    checkpoint.write_text("[1, 2]")
    proc = sipit_cli("invert", str(states_file), "--checkpoint", str(checkpoint))
    assert_one_line_error(proc, "checkpoint")


def test_text_and_text_file_together_are_refused(tmp_path):
    text_file = tmp_path / "p.txt"
    text_file.write_text("Hello")
    proc = sipit_cli("capture", "--text", "Hi", "--text-file", str(text_file), "-o", "x")
    assert_one_line_error(proc, "not both")


def test_api_checks_states_objects(states_file, llama):
    states = states_mod.load(states_file)
    bad = states_mod.States(states=states.states.clone(), meta=dict(states.meta))
    bad.states[1, 0] = float("inf")
    with pytest.raises(sipit.SipitError, match="NaN/inf"):
        sipit.invert(bad, model=llama)
    with pytest.raises(sipit.SipitError, match="states must be"):
        sipit.invert(states_mod.States(states.states[None], dict(states.meta)), model=llama)
    with pytest.raises(sipit.SipitError, match="provenance"):
        sipit.invert(states_mod.States(states.states, {}), model=llama)
    with pytest.raises(sipit.SipitError, match="not Tensor"):
        sipit.invert(states.states, model=llama)
    with pytest.raises(sipit.SipitError, match="unknown dtype"):
        sipit.invert(states, model=llama, dtype="fp8")


def test_layer_out_of_range(tmp_path):
    proc = sipit_cli("capture", "--text", "Hello", "--layer", "9", "-o", str(tmp_path / "x"))
    assert_one_line_error(proc, "out of range")


def test_empty_prompt(tmp_path):
    proc = sipit_cli("capture", "--text", "", "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(proc, "empty")


def test_prompt_longer_than_the_context(tmp_path):
    text_file = tmp_path / "long.txt"
    text_file.write_text("to be or not " * 400)
    proc = sipit_cli("capture", "--text-file", str(text_file), "-o", str(tmp_path / "x"))
    assert_one_line_error(proc, "too long")


def test_unknown_policy(states_file):
    assert_one_line_error(sipit_cli("invert", str(states_file), "--policy", "psychic"), "policy")


def test_library_raises_the_same_errors(tmp_path):
    with pytest.raises(sipit.SipitError, match="not found"):
        sipit.invert(tmp_path / "missing.safetensors")


def test_bundles_keep_tensors_and_data_without_pickle(tmp_path):
    path = tmp_path / "bundle.safetensors"
    tensors = dict(a=torch.arange(6.0).view(2, 3), b=torch.tensor([1, 2], dtype=torch.int64))
    states_mod.save_bundle(path, tensors, dict(step=3, name="x", inf=float("inf")))
    back, data = states_mod.load_bundle(path)
    assert torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])
    assert data == dict(step=3, name="x", inf=float("inf"))

    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(sipit.SipitError, match="damaged"):
        states_mod.load_bundle(path)
