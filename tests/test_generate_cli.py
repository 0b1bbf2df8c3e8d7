"""`python -m spotlight_jax.generate` (spotlight-generate): help, bad values, and runs on the embedded SmolLM2."""

import subprocess
import sys

import pytest

from spotlight_jax.generate import main


def test_help_lists_every_option_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--method", "--hashes", "--stream", "--no-stream", "--chat", "--no-chat", "--max-new-tokens",
                "--temperature", "--top-k", "--top-p", "--seed", "--stop", "--prompt-file", "--model", "--stats",
                "--keep-ratio", "--sink-tokens", "--debug"):  # fmt: skip
        assert opt in text, opt
    assert "(default: 128)" in text and "spotlight" in text


@pytest.mark.parametrize(
    "argv, match",
    [
        (["hi", "--temperature", "-1"], "temperature"),
        (["hi", "--temperature", "nan"], "temperature"),
        (["hi", "--top-p", "1.5"], "top_p"),
        (["hi", "--top-k", "-2"], "top_k"),
        (["hi", "--max-new-tokens", "0"], "max-new-tokens"),
        (["hi", "--keep-ratio", "0"], "keep_ratio"),
        (["hi", "--method", "spotlight"], "needs --hashes"),
        (["hi", "--method", "spotlight", "--hashes", "/no/such/folder"], "hash checkpoint folder not found"),
        (["hi", "--hashes", "/no/such/folder"], "--hashes is used by"),
        (["--prompt-file", "/no/such/prompt.txt"], "prompt file not found"),
        (["hi", "--prompt-file", "/no/such/prompt.txt"], "not both"),
        ([], "no prompt"),
    ],
)
def test_bad_values_exit_2_with_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_argparse_errors_and_module_entry_point():
    """A value outside `choices` (argparse's own error) and a bad value through `python -m`: exit 2, no traceback, no
    runpy warning."""
    for argv, match in ((["hi", "--method", "nope"], "invalid choice"), (["hi", "--top-p", "0"], "top_p")):
        r = subprocess.run([sys.executable, "-m", "spotlight_jax.generate", *argv], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert match in r.stderr and "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(("error: ", "spotlight-generate: error: "))


def test_debug_reraises():
    with pytest.raises(ValueError, match="top_p"):
        main(["hi", "--top-p", "2", "--debug"])


@pytest.mark.real_model
def test_real_run_with_stats(smollm2_jax, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("What is the capital of France?")
    assert main(["--prompt-file", str(prompt), "--max-new-tokens", "4", "--stats"]) == 0  # loads the embedded model
    out, err = capsys.readouterr()
    assert out.strip() and out.endswith("\n")
    assert "time to first token" in err and "tokens/s" in err and "total" in err


@pytest.mark.real_model
def test_real_stream_chat(smollm2_jax, capsys, monkeypatch):
    import spotlight_jax.convert

    model, tok, _ = smollm2_jax
    monkeypatch.setattr(spotlight_jax.convert, "load_model", lambda source=None: (model, tok))  # loaded once
    argv = ["What is the capital of France?", "--chat", "--max-new-tokens", "4"]
    assert main([*argv, "--stats"]) == 0  # --stats streams to a clock: the same compiled program as --stream
    printed = capsys.readouterr().out
    assert main([*argv, "--stream"]) == 0
    assert capsys.readouterr().out == printed
