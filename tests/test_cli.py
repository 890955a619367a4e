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
    states.meta["weights_hash"] = "0" * 16
    path = states_mod.save(tmp_path / "other.safetensors", states)
    assert_one_line_error(sipit_cli("invert", str(path)), "weights")


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
