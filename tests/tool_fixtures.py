"""The `services` fixture: ChatEndpoints over the tiny tool-calling models (tool_models.py).

pytest_plugins = ["tests.tokenizer_fixtures", "tests.tool_fixtures"]

def test_something(services) -> None:
    service = services("hermes")  # built on first use, shut down with the module
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flashserve.api.endpoints.chat import ChatEndpoint
from tests.tool_models import FAMILIES, build_family, make_service


@pytest.fixture(scope="module")
def services(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], ChatEndpoint]]:
    root = tmp_path_factory.mktemp("tool_families")
    built: dict[str, ChatEndpoint] = {}

    def get(name: str) -> ChatEndpoint:
        if name not in built:
            base_dir: Path = request.getfixturevalue(f"{FAMILIES[name].base}_tokenizer_dir")
            folder = build_family(name, base_dir, root / name)
            built[name] = make_service(folder, kv_cache_memory_gb=0.1)
        return built[name]

    yield get
    for service in built.values():
        service.frontend.engine.shutdown()
