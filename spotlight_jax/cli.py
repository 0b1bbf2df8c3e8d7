"""What every command line of the package shares (`spotlight-train`, `-eval`, `-bench`, `-generate`).

- Options come from frozen config dataclasses (`add_config_args`): each field's default and help text live once, in
  the dataclass that the library function takes, and the parser is derived from it. A field's metadata (`option()`)
  may add a flag name, hidden deprecated aliases, `choices=` and the item type of a list.
- One spelling per concept (`--model`, `--data`, `--batch`, `--out-dir`, ...), lists as space-separated values that
  also take the old comma form (`ListAction`), booleans as `--x / --no-x`.
- The library raises ValueError (and FileNotFoundError, ...); `run_cli` turns those into a one-line `error: ...`
  and exit code 2, and `--debug` shows the traceback instead.
- `dispatch` is the `python -m spotlight_jax.eval|bench SUBCOMMAND` front end: a subcommand module defines `CONFIG`
  (its config dataclass) and `run(config)`, and is imported only when chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from spotlight_jax.config import split_method

# The shape presets of `ModelConfig.preset`, named as configs/*.json are (tests/test_cli.py checks the two agree).
MODEL_PRESETS = ("qwen2.5-7b", "llama3-8b", "smollm2-135m")
MODEL_HELP = "model source for load_model: a folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)"
# What a library raises for a bad value or a missing file; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)


def says_default(text: str) -> bool:
    """Whether a help text already states its default, e.g. what None means: "(default: the embedded model)"."""
    return bool(re.search(r"\(default|default:", text))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option's help (unless the help already says its default, e.g. what None means), and
    descriptions / examples printed as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if says_default(text) or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action.default, tuple):  # a list option: as it is typed, `0 1`, not `(0, 1)`
            shown = " ".join(map(str, action.default)) or "none"
            return text + " (default: " + shown.replace("%", "%%") + ")"
        return text + " (default: %(default)s)"


class ListAction(argparse.Action):
    """A list option: `--dense-layers 0 1`; the old comma form `--dense-layers 0,1` still works (`sep`, or None for
    values that may hold commas). Items are converted with `item_type` and checked against `item_choices` here, after
    the split (argparse would check the unsplit words)."""

    def __init__(self, option_strings, dest, item_type=str, sep=",", item_choices=None, **kw):
        kw.setdefault("nargs", "+")
        if item_choices is not None and "metavar" not in kw:
            kw["metavar"] = "{" + ",".join(map(str, item_choices)) + "}"
        super().__init__(option_strings, dest, **kw)
        self.item_type, self.sep, self.item_choices = item_type, sep, item_choices

    def __call__(self, parser, namespace, values, option_string=None):
        words = [w.strip() for v in values for w in (v.split(self.sep) if self.sep else [v])]
        out = []
        for w in filter(None, words):
            try:
                item = self.item_type(w)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                raise argparse.ArgumentError(self, f"invalid value {w!r}: {e}") from None
            if self.item_choices is not None and item not in self.item_choices:
                choices = ", ".join(map(repr, self.item_choices))
                raise argparse.ArgumentError(self, f"invalid choice: {item!r} (choose from {choices})")
            out.append(item)
        setattr(namespace, self.dest, tuple(out))


def option(default: Any, help: str, **cli: Any) -> Any:
    """A config dataclass field with its command-line metadata: `help`, and optionally `flag` (the option's name
    when it differs from the field's), `aliases` (hidden deprecated spellings), `choices`, `type` (of the value, or
    of each item of a tuple field), `sep` (a list's old separator, None: no split), `metavar`, `nargs`, `boolean`
    (an on/off flag whose default is None), `cli=False` (no option)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def preset_name(name: str, choices: Sequence[str] = MODEL_PRESETS) -> str:
    """The canonical spelling of a model-shape preset: 'llama-3-8b' and 'Llama3_8B' name 'llama3-8b'."""
    key = lambda s: re.sub(r"[-_.]", "", s.lower())
    found = next((c for c in choices if key(c) == key(name)), None)
    if found is None:
        raise ValueError(f"unknown model shape {name!r}; choose from {', '.join(choices)}")
    return found


def preset_type(choices: Sequence[str] = MODEL_PRESETS) -> Callable[[str], str]:
    """An argparse `type` accepting any spelling of a preset (`preset_name`)."""

    def parse(text: str) -> str:
        try:
            return preset_name(text, choices)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = "model shape"
    return parse


def model_field() -> Any:
    """`--model`: a real model for load_model."""
    return option(None, MODEL_HELP)


def preset_field(default: str | None, choices: Sequence[str] = MODEL_PRESETS, note: str = "", **kw) -> Any:
    """`--model`: a model-shape preset (random weights of the real shapes), any spelling (`preset_name`)."""
    help = "model shape preset" + (f" ({note})" if note else "")
    return option(default, help, type=preset_type(choices), metavar="{" + ",".join(choices) + "}", **kw)


def out_dir_field(tool: str) -> Any:
    """`--out-dir`: where a run writes its files; by default a fresh run folder, never the committed results."""
    return option(None, f"folder for the result files (default: a new runs/{tool}/<command>-<UTC time>/)")


def add_model_arg(p: argparse.ArgumentParser) -> None:
    """`--model` of a hand-written parser, spelled and explained as everywhere else."""
    p.add_argument("--model", default=None, help=MODEL_HELP)


def add_debug_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action=argparse.BooleanOptionalAction, default=False,
                   help="show the full traceback of an error instead of a one-line message")  # fmt: skip


def add_config_args(
    p: argparse.ArgumentParser,
    cls: type,
    *,
    suppress_defaults: bool = False,
    overrides: dict[str, dict[str, Any]] | None = None,
    legacy_out: bool = False,
) -> None:
    """One option per field of the dataclass `cls` (`option()` metadata; `overrides`: more metadata by field name).

    `suppress_defaults`: an option not given is absent from the namespace (train layers flags over a JSON config),
    and its help says the dataclass default. `legacy_out`: also the hidden old `--out` of the eval / bench commands.
    """
    for f in dataclasses.fields(cls):
        meta = {**f.metadata, **(overrides or {}).get(f.name, {})}
        if meta.get("cli", True) is False:
            continue
        default = f.default
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help", "")}
        if suppress_defaults:
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            kw["help"] = kw["help"] if says_default(kw["help"]) else kw["help"] + f" (default: {shown})"
            kw["default"] = argparse.SUPPRESS
        else:
            kw["default"] = default
        if isinstance(default, bool) or meta.get("boolean"):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple) or "sep" in meta or meta.get("nargs"):
            item = meta.get("type") or (type(default[0]) if default else str)
            kw.update(action=ListAction, item_type=item, sep=meta.get("sep", ","), nargs=meta.get("nargs", "+"))
            kw["item_choices"] = meta.get("choices")
        else:
            kw["type"] = meta.get("type") or (type(default) if default is not None else str)
            kw["choices"] = meta.get("choices")
        flag = meta.get("flag", f.name.replace("_", "-"))
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        elif kw.get("action") in (None, ListAction) and not kw.get("choices") and not kw.get("item_choices"):
            kw["metavar"] = flag.upper().replace("-", "_")  # argparse would name the field, not the flag
        p.add_argument("--" + flag, **kw)
        for alias in meta.get("aliases", ()):  # deprecated spellings: still accepted, not shown
            p.add_argument("--" + alias, **{**kw, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS})
    if legacy_out and "out_dir" in {f.name for f in dataclasses.fields(cls)}:
        # The old `--out`: a folder (eval perplexity / passkey / fidelity), or a file path / prefix where the command
        # also has a `--name` (eval recall, bench kernels, bench train). Hidden; `config_from_args` resolves it.
        p.add_argument("--out", dest="_legacy_out", default=None, help=argparse.SUPPRESS)


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any):
    """The dataclass `cls` from the namespace's fields of that name (plus `extra`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    legacy = getattr(args, "_legacy_out", None)
    if legacy and "name" in names:
        stem = os.path.splitext(os.path.basename(legacy))[0]
        values.update(out_dir=os.path.dirname(legacy) or ".", name=stem)
    elif legacy:
        values["out_dir"] = legacy
    return cls(**{**values, **extra})


def method_fields(spec: str) -> dict:
    """'spotlight+sink4' -> RetrievalConfig fields {method, sink_tokens} (`config.split_method`; a bad spec raises
    its ValueError)."""
    name, fields = split_method(spec)
    return {"method": name, **fields}


def error_message(e: BaseException) -> str:
    """One line: a KeyError's own message without its quotes, every other error's text with newlines folded."""
    text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    return " ".join(text.split()) or type(e).__name__


def run_cli(fn: Callable[[], Any], *, debug: bool = False) -> int:
    """Run a command's body: an int result is its exit code (None: 0); a library error a one-line `error: ...` on
    stderr and exit code 2 (argparse's code for a bad command line); with `debug` the error propagates."""
    try:
        result = fn()
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def dispatch(
    argv: Sequence[str] | None, *, prog: str, description: str, package: str, subcommands: dict[str, str]
) -> int:
    """`prog SUBCOMMAND [options]`: parse with the chosen module's `CONFIG` options, then `run_cli` its `run`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, help_text in subcommands.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if argv and argv[0] == name:  # import only the chosen module (each pulls in its own heavy modules)
            module = importlib.import_module(f"{package}.{name}")
            p.description = module.__doc__ or help_text
            add_config_args(p, module.CONFIG, legacy_out=True)
            add_debug_arg(p)
    args = parser.parse_args(argv)
    module = importlib.import_module(f"{package}.{args.command}")
    return run_cli(lambda: module.run(config_from_args(module.CONFIG, args)), debug=args.debug)
