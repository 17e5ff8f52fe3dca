"""The model commands' parsers: each accepts exactly what its typed entry function takes."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from models import args as model_args
from tagstream.cli import get_args_parser

#: command: (its module, its config class, the flags it requires, their typed values)
COMMANDS = {
    "train": ("models.train", "TrainConfig", ["--data", "d"], {"data": Path("d")}),
    "pseudo-label": (
        "models.pseudo_label",
        "PseudoLabelConfig",
        ["--teacher", "t.pt", "--unlabeled", "u"],
        {"teacher": Path("t.pt"), "unlabeled": Path("u")},
    ),
    "prune": (
        "models.prune",
        "PruneConfig",
        ["--checkpoint", "c.pt"],
        {"checkpoint": Path("c.pt")},
    ),
    "export": (
        "models.export",
        "ExportConfig",
        ["--checkpoint", "c.pt"],
        {"checkpoint": Path("c.pt")},
    ),
}

#: Flags of other commands (or of none that could use them), each refused.
FOREIGN = [
    ("export", "--top-k", "5"),
    ("export", "--rounds", "3"),
    ("export", "--device", "cpu"),
    ("export", "--no-progress", None),
    ("train", "--checkpoint", "x"),
    ("train", "--finetune-epochs", "2"),
    ("train", "--precision", "int8"),
    ("prune", "--teacher", "t"),
    ("prune", "--epochs", "3"),
    ("prune", "--opt", "adamw"),
    ("prune", "--no-progress", None),
    ("pseudo-label", "--precision", "int8"),
    ("pseudo-label", "--distill", None),
    # The student takes the teacher's input size, splits and seed, and never resumes.
    ("pseudo-label", "--input-size", "32"),
    ("pseudo-label", "--seed", "1"),
    ("pseudo-label", "--resume", "r.pt"),
]


def command_parser(command: str) -> argparse.ArgumentParser:
    module = importlib.import_module(COMMANDS[command][0])
    return module.get_args_parser()


def config_class(command: str) -> type:
    module_name, class_name, _, _ = COMMANDS[command]
    return getattr(importlib.import_module(module_name), class_name)


def flag_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions if action.dest != "help"}


@pytest.mark.parametrize("via", ["cli", "own parser"])
@pytest.mark.parametrize(("command", "flag", "value"), FOREIGN)
def test_a_flag_of_another_command_is_refused(command, flag, value, via, capsys) -> None:
    required = COMMANDS[command][2]
    foreign = [flag] if value is None else [flag, value]
    if via == "cli":
        parse = get_args_parser().parse_args
        argv = [command, *required, *foreign]
    else:
        parse = getattr(model_args, command.replace("-", "_") + "_parser")().parse_args
        argv = [*required, *foreign]
    parse(argv[: len(argv) - len(foreign)])  # accepted without the foreign flag
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {' '.join(foreign)}" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_required_flags_are_required(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        get_args_parser().parse_args([command])
    assert exit_info.value.code == 2
    assert (
        "the following arguments are required: "
        + ", ".join(flag for flag in COMMANDS[command][2] if flag.startswith("--"))
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_flag_is_a_field_of_the_config_with_the_same_default(command) -> None:
    parser, config = command_parser(command), config_class(command)
    _, _, required, typed = COMMANDS[command]
    assert flag_dests(parser) == {field.name for field in dataclasses.fields(config)}
    # The module's parser is the one the CLI uses: the same flags, the same defaults.
    from_cli = get_args_parser().parse_args([command, *required])
    from_module = parser.parse_args(required)
    assert config.from_args(from_cli) == config.from_args(from_module) == config(**typed)


def other_value(action: argparse.Action) -> list[str]:
    """Command-line words that give `action` a value other than its default."""
    if action.nargs == 0:  # store_true
        return [action.option_strings[0]]
    if action.choices:
        value = next(choice for choice in action.choices if choice != action.default)
    elif action.type is int:
        value = (action.default or 0) + 7
    elif action.type is float:
        value = (action.default or 0.0) + 0.125
    else:
        value = f"some/{action.dest}"
    return [action.option_strings[0], str(value)]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_reaches_the_config(command) -> None:
    parser, config = command_parser(command), config_class(command)
    argv = [word for a in parser._actions if a.dest != "help" for word in other_value(a)]
    parsed = config.from_args(parser.parse_args(argv))
    defaults = config(**COMMANDS[command][3])
    for field in dataclasses.fields(config):
        value = getattr(parsed, field.name)
        assert value != getattr(defaults, field.name), field.name
        if isinstance(value, Path):
            assert value == Path(f"some/{field.name}"), field.name


def test_building_the_cli_parser_does_not_import_torch() -> None:
    code = (
        "import sys, tagstream.cli\n"
        "parser = tagstream.cli.get_args_parser()\n"
        "for argv in (['train', '--data', 'd'], ['export', '--checkpoint', 'c'],\n"
        "             ['prune', '--checkpoint', 'c'],\n"
        "             ['pseudo-label', '--teacher', 't', '--unlabeled', 'u']):\n"
        "    parser.parse_args(argv)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def shown_model_commands() -> list[tuple[str, list[str]]]:
    """Every model command the READMEs show, in code blocks or inline, as argv."""
    repo = Path(__file__).parents[2]
    shown = []
    for name in ("README.md", "models/README.md"):
        text = (repo / name).read_text().replace("\\\n", " ")
        commands = "|".join(COMMANDS)
        for match in re.finditer(r"(?m)(?:^\s*|`)tagstream ((?:" + commands + r") [^`\n]*)", text):
            # A table cell's `a\|b\|c` shows alternatives: take the first.
            line = re.sub(r"(\S+?)(?:\\\|\S+)+", r"\1", match.group(1))
            # Placeholders (DIR, CKPT, N) stand for a value: any that parses.
            argv = ["1" if word.isupper() else word for word in shlex.split(line, comments=True)]
            shown.append((name, argv))
    return shown


def test_the_readmes_show_valid_model_commands() -> None:
    shown = shown_model_commands()
    assert {argv[0] for _, argv in shown} == set(COMMANDS)
    parser = get_args_parser()
    for name, argv in shown:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name} shows `tagstream {shlex.join(argv)}`, which does not parse")
