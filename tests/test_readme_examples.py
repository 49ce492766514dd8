"""The README's examples against the local server, run as printed: every Python block and
curl command that talks to http://127.0.0.1:8080 (what `make serve` listens on) runs
against the real Truss server, with only the port changed. An example that raises, exits
non-zero or answers an error fails the test, so the README cannot drift from the API."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest_plugins = ["tests.server_fixture"]
pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
LOCAL = "http://127.0.0.1:8080"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def local_blocks(language: str) -> list[str]:
    return [
        code
        for lang, code in FENCE.findall(README.read_text())
        if lang == language and LOCAL in code
    ]


def curl_commands() -> list[str]:
    """Each `curl` command of the local bash blocks, continuation lines joined."""
    commands = []
    for block in local_blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        # A quoted body may span lines: a command runs until its quotes balance.
        current = ""
        for line in joined.splitlines():
            current = f"{current}\n{line}" if current else line
            if current.count("'") % 2 == 0:
                if current.lstrip().startswith("curl "):
                    commands.append(current.strip())
                current = ""
    return commands


def test_the_readme_has_local_examples_for_every_endpoint() -> None:
    code = "\n".join(local_blocks("python") + curl_commands())
    for path in ("chat.completions", "completions.create", "messages.", "responses."):
        assert path in code, path
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"):
        assert any(route in command for command in curl_commands()), route


def example_id(code: str) -> str:
    """The API an example calls first: client.chat.completions.create -> chat.completions."""
    match = re.search(r"client\.([\w.]+?)\.(?:create|stream)\(", code)
    return match.group(1) if match else "python"


@pytest.mark.parametrize("code", local_blocks("python"), ids=example_id)
def test_python_example_runs_as_printed(code: str, truss_server: str) -> None:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace(LOCAL, truss_server), "README.md", "exec"), {})  # noqa: S102
    assert printed.getvalue().strip()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("command", curl_commands(), ids=lambda c: c.split()[2][22:])
def test_curl_example_runs_as_printed(command: str, truss_server: str) -> None:
    done = subprocess.run(
        ["bash", "-c", command.replace(LOCAL, truss_server) + " --fail-with-body"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip()
    assert not re.search(r'"error":\s*\{', done.stdout), done.stdout  # an error object
