"""Every `truss ...` command line in the docs parses with truss 0.18.36's own click CLI
(nothing runs): an unknown option, a missing or extra argument, an option truss marks
[DEPRECATED], or two options truss says cannot go together fail the test, so the
README cannot drift from the truss it names."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.core import ParameterSource
from truss.cli.cli import truss_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / "README.md", REPO_ROOT / "examples" / "README.md"]
DOCS += sorted((REPO_ROOT / "docs").glob("*.md"))
SHELL_FENCE = re.compile(r"^```(bash|sh|shell|console)?\s*$")
# truss's own help text for options that exclude others ("Cannot be used with --watch").
EXCLUDES = re.compile(r"[Cc]annot be used with ((?:--[a-z-]+(?:,? (?:or )?)?)+)")


def truss_command_lines(path: Path) -> list[str]:
    """`truss ...` lines inside shell code blocks, continuations joined, prompts dropped."""
    lines: list[str] = []
    in_shell = in_block = False
    pending = ""
    for raw in path.read_text().splitlines():
        if raw.startswith("```"):
            in_shell = not in_block and bool(SHELL_FENCE.match(raw))
            in_block = not in_block
            continue
        if not in_shell:
            continue
        line = pending + raw.strip().removeprefix("$ ")
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith("truss "):
            lines.append(line)
    return lines


def parse_truss_command(line: str) -> tuple[click.Command, click.Context]:
    """Parse one command line the way `truss` would, down to the leaf command; run nothing."""
    args = shlex.split(line, comments=True)
    assert args[0] == "truss"
    ctx = truss_cli.make_context("truss", args[1:])
    command: click.Command = truss_cli
    while isinstance(command, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
    return command, ctx


def misuses(command: click.Command, ctx: click.Context) -> list[str]:
    """Options given on the line that truss deprecates, or that exclude one another."""
    given = [
        p
        for p in command.params
        if isinstance(p, click.Option)
        and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE
    ]
    flags = {opt for p in given for opt in p.opts}
    problems = []
    for p in given:
        help_text = p.help or ""
        if "[DEPRECATED]" in help_text or getattr(p, "deprecated", False):
            problems.append(f"{p.opts[0]} is deprecated: {help_text}")
        for match in EXCLUDES.finditer(help_text):
            for other in re.findall(r"--[a-z-]+", match.group(1)):
                if other in flags:
                    problems.append(f"{p.opts[0]} cannot be used with {other}")
    return problems


def check(line: str) -> list[str]:
    """Why a line is wrong for this truss (empty: it is right)."""
    try:
        command, ctx = parse_truss_command(line)
    except click.UsageError as exc:
        return [exc.format_message()]
    return misuses(command, ctx)


COMMANDS = [(path, line) for path in DOCS for line in truss_command_lines(path)]


def test_the_readme_shows_push_and_predict_as_truss_0_18_36_has_them():
    readme = [
        line for path, line in COMMANDS if path.name == "README.md" and path.parent == REPO_ROOT
    ]
    words = [shlex.split(line, comments=True) for line in readme]
    pushes = [w for w in words if w[1] == "push"]
    predicts = [w for w in words if w[1] == "predict"]
    assert ["truss", "push"] in pushes  # published by default
    assert any("--promote" in w for w in pushes) and any("--watch" in w for w in pushes)
    assert any("--config" in w for w in pushes)
    assert any("--published" in w for w in predicts)
    assert any("--model-deployment" in w for w in predicts)
    assert any("--published" not in w and "--model-deployment" not in w for w in predicts)


@pytest.mark.parametrize(
    "path, line", COMMANDS, ids=[f"{p.name}:{line[:60]}" for p, line in COMMANDS]
)
def test_truss_command_line_parses_with_truss_cli(path, line, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # --config paths must exist, relative to the repo root
    assert check(line) == [], f"{path.relative_to(REPO_ROOT)}: {line}"


@pytest.mark.parametrize(
    "line, reason",
    [
        ("truss push --publish", "is deprecated"),
        ("truss push --trusted", "is deprecated"),
        ("truss predict --model-version abc -d '{}'", "is deprecated"),
        # --remote takes the remote's name: the JSON becomes an extra argument.
        ("truss predict --remote -d '{\"a\": 1}'", "unexpected extra argument"),
        ("truss push --no-such-flag", "No such option"),
        ("truss push --watch --deployment-name x", "cannot be used with --watch"),
        ("truss predcit -d '{}'", "No such command"),
        ("truss push --config no/such/config.yaml", "does not exist"),
    ],
)
def test_the_checker_rejects_what_truss_would(line, reason, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    problems = check(line)
    assert any(reason in p for p in problems), problems
