"""The four command lines (`spotlight-train`, `-eval`, `-bench`, `-generate`) as a user meets them: `--help` of every
command and subcommand, one bad value for each, the shared spellings and the deprecated ones. Everything runs
in-process through `main(argv)` and stops before any model or benchmark work, so each test takes a moment."""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import tomllib

import pytest

from spotlight_jax import bench, cli
from spotlight_jax import eval as evaluate
from spotlight_jax.bench.common import run_folder

# The package exports the functions `generate` and `train` under the modules' names.
generate = importlib.import_module("spotlight_jax.generate")
train = importlib.import_module("spotlight_jax.train")

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAINS = {"train": train.main, "eval": evaluate.main, "bench": bench.main, "generate": generate.main}
HELP_CASES = (
    [("train", []), ("generate", []), ("eval", []), ("bench", [])]
    + [("eval", [name]) for name in evaluate.subcommands()]
    + [("bench", [name]) for name in bench.SUBCOMMANDS]
)


def _ids(x):
    return " ".join(x) if isinstance(x, list) else x


def _call(command: str, argv: list[str]) -> int:
    """Exit code of `command argv`, whether main returns it or argparse exits with it."""
    try:
        return MAINS[command](argv)
    except SystemExit as e:
        return e.code


def _option_entries(text: str) -> list[str]:
    """The help text of each option ('  --flag ...' up to the next option or section)."""
    entries, current = [], None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            entries.append(current)
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    return [" ".join(" ".join(e).split()) for e in entries]


@pytest.mark.parametrize("command, argv", HELP_CASES, ids=_ids)
def test_help_exits_0_and_every_option_shows_its_default(command, argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per option where it fits, so entries are easy to cut out
    assert _call(command, [*argv, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: spotlight-" + command)
    if command in ("eval", "bench") and not argv:  # the top level: what the tool does, examples, its commands
        assert "examples:" in text and "--out-dir" in text
        names = evaluate.subcommands() if command == "eval" else bench.SUBCOMMANDS
        assert all(name in text for name in names)
        return
    entries = [e for e in _option_entries(text) if not e.startswith("-h, --help")]
    assert len(entries) > 3
    for entry in entries:
        assert cli.says_default(entry), f"no default shown: {entry}"


LIBRARY_ERRORS = [  # (command, argv, message): the library's ValueError / FileNotFoundError, before any heavy work
    ("train", ["--config", "/no/such/config.json"], "no config file"),
    ("eval", ["perplexity", "--methods", "dense", "oracle+sinks"], "unknown method modifier"),
    ("eval", ["passkey", "--methods", "dense", "spotlight"], "needs hashes"),
    ("eval", ["fidelity", "--hashes", "/no/such/hashes"], "hash checkpoint folder not found"),
    ("eval", ["recall", "--hashes", "=runs/x"], "NAME=PATH"),
    ("bench", ["decode", "--steps", "0", "--context", "0"], "must be"),
    ("bench", ["kernels", "--model", "llama-3-8b", "--topk-variants", "x=1"], "unknown top-k variant key 'x'"),
    ("bench", ["generate", "--methods", "dense+1launch"], "apply to sparse methods"),
    ("bench", ["e2e", "--methods", "spotlight+sideways3"], "unknown method modifier"),
    ("bench", ["attention", "--heads", "4:3:32"], "not a multiple"),
    ("bench", ["train", "--bits", "100"], "bits"),
    ("generate", ["hi", "--top-p", "1.5"], "top_p"),
]


@pytest.mark.parametrize("command, argv, match", LIBRARY_ERRORS, ids=_ids)
def test_a_bad_value_is_one_line_and_exit_2(command, argv, match, capsys):
    assert _call(command, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    assert "Traceback" not in err


PARSER_ERRORS = [  # (command, argv, message): refused by the parser (choices, types, list items)
    ("train", ["--bits", "100"], "invalid choice"),
    ("train", ["--dense-layers", "0", "x"], "invalid value 'x'"),
    ("eval", ["nope"], "invalid choice"),
    ("eval", ["recall", "--data-part", "test"], "invalid choice"),
    ("bench", ["decode", "--model", "gpt-2"], "unknown model shape 'gpt-2'"),
    ("bench", ["kernels", "--ops", "topk,sorting"], "invalid choice: 'sorting'"),
    ("bench", ["train", "--mode", "fast"], "invalid choice"),
    ("generate", ["hi", "--method", "nope"], "invalid choice"),
]


@pytest.mark.parametrize("command, argv, match", PARSER_ERRORS, ids=_ids)
def test_a_value_the_parser_refuses_ends_with_one_error_line(command, argv, match, capsys):
    assert _call(command, argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert re.match(r"(spotlight-\S+( \S+)?: )?error: ", last) and match in last, err
    assert "Traceback" not in err


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="not a multiple"):
        bench.main(["attention", "--heads", "4:3:32", "--debug"])
    with pytest.raises(FileNotFoundError):
        train.main(["--config", "/no/such/config.json", "--debug"])


def _config(cls, argv: list[str]):
    p = argparse.ArgumentParser()
    cli.add_config_args(p, cls, legacy_out=True)
    return cli.config_from_args(cls, p.parse_args(argv))


def test_lists_take_spaces_or_the_old_commas_and_old_spellings_still_work():
    from spotlight_jax.bench.kernels import KernelsConfig
    from spotlight_jax.eval.perplexity import PerplexityConfig
    from spotlight_jax.eval.recall import RecallConfig

    new = _config(KernelsConfig, [
        "--model", "llama3-8b", "--batch", "1", "8", "--context", "32768", "--repeats", "3", "--no-xla",
        "--ops", "topk", "attention", "--topk-variants", "512:32:4", "bs=1024,T=32",
    ])  # fmt: skip
    old = _config(KernelsConfig, [
        "--models", "llama-3-8b", "--batches", "1,8", "--lengths", "32768", "--reps", "3", "--no-xla",
        "--ops", "topk,attention", "--topk-variants", "512:32:4;bs=1024,T=32",
    ])  # fmt: skip
    assert new == old
    assert new.model == ("llama3-8b",) and new.batch == (1, 8) and not new.xla
    assert new.topk_variants == ("512:32:4", "bs=1024,T=32")
    assert _config(PerplexityConfig, ["--dense-layers", "0,1,2"]).dense_layers == (0, 1, 2)
    assert _config(PerplexityConfig, ["--dense-layers"]).dense_layers == ()
    recall = _config(RecallConfig, ["--dataset", "x.jsonl", "--no-random", "--layers", "2,3"])
    assert (recall.data, recall.random, recall.layers) == ("x.jsonl", False, (2, 3))
    args = train.build_parser().parse_args(["--data", "a.jsonl", "--batch", "2", "--dense-layers", "0", "1", "2"])
    cfg = train.config_from_args(args)
    assert (cfg.dataset, cfg.batch_size, cfg.dense_layers) == ("a.jsonl", 2, (0, 1, 2))


def test_results_go_to_a_run_folder_unless_told():
    from spotlight_jax.bench.kernels import KernelsConfig
    from spotlight_jax.eval.perplexity import PerplexityConfig
    from spotlight_jax.eval.recall import RecallConfig

    folder = run_folder("eval", "perplexity")
    assert folder.parts[:2] == ("runs", "eval") and folder.name.startswith("perplexity-")
    assert str(run_folder("bench", "decode", "experiments/results")) == "experiments/results"
    assert PerplexityConfig().out_dir is None and KernelsConfig().out_dir is None
    # the old `--out`: a folder for the decode-path evals, a path or prefix where the command has a --name
    assert _config(PerplexityConfig, ["--out", "experiments/results/q"]).out_dir == "experiments/results/q"
    kernels = _config(KernelsConfig, ["--out", "gpu_out/kernels_20261123.json"])
    assert (kernels.out_dir, kernels.name) == ("gpu_out", "kernels_20261123")
    recall = _config(RecallConfig, ["--out", "experiments/results/recall_smollm2"])
    assert (recall.out_dir, recall.name) == ("experiments/results", "recall_smollm2")


def test_one_model_preset_naming():
    from spotlight_jax.config import ModelConfig

    assert set(cli.MODEL_PRESETS) == {p.stem for p in (ROOT / "configs").glob("*.json")}
    for name in cli.MODEL_PRESETS:
        ModelConfig.preset(name)
    assert cli.preset_name("llama-3-8b") == "llama3-8b" and cli.preset_name("Qwen2.5-7B") == "qwen2.5-7b"
    with pytest.raises(ValueError, match="unknown model shape"):
        cli.preset_name("gpt-2")


def test_console_scripts_exist_and_are_documented():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    readme = (ROOT / "README.md").read_text()
    assert set(scripts) == {f"spotlight-{c}" for c in MAINS}
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target
        assert re.search(f"`{name}[` ]", readme), f"{name} is not in the README's command table"
