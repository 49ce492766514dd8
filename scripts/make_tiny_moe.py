"""Write a tiny random MoE checkpoint with a real tokenizer and chat template.

    python scripts/make_tiny_moe.py {qwen3-moe,glm4-moe} OUT_DIR

qwen3-moe: a Qwen3MoeForCausalLM with the Qwen3-style (ChatML, Hermes tool calls,
<think>) test template; glm4-moe: a Glm4MoeForCausalLM with GLM-4.6's own template
(GLM tool calls, <think>). Both on the 32k Mistral SentencePiece tokenizer the
tests build offline (flashserve.testing.offline_tokenizers) plus each family's
added tokens; the same folders tests/test_moe_server.py serves. Serve one with

    python -m flashserve.serve --model OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "packages"), str(REPO_ROOT)]

from flashserve.testing.offline_tokenizers import make_sentencepiece_tokenizer_dir  # noqa: E402
from tests.tiny_models import save_tiny_glm4_moe, save_tiny_qwen3_moe  # noqa: E402
from tests.tokenizer_fixtures import MISTRAL_CHAT_TEMPLATE  # noqa: E402
from tests.tool_models import build_family  # noqa: E402

MODELS = {"qwen3-moe": ("hermes", save_tiny_qwen3_moe), "glm4-moe": ("glm45", save_tiny_glm4_moe)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    family, save_model = MODELS[args.model]
    with tempfile.TemporaryDirectory() as scratch:
        base = make_sentencepiece_tokenizer_dir(Path(scratch), MISTRAL_CHAT_TEMPLATE)
        out = build_family(family, base, args.out, args.seed, save_model)
    print(f"{args.model} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
