"""One served model's frontend: what every endpoint needs between its protocol and the engine.

Endpoints parse and validate their own request shape, render or take the prompt text,
and hand the rest here: `tokenize` (the prompt's ids), `build` (the request's output
plan, its grammar and its SamplingParams, built once) and `generate` (the shared loop).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from flashserve.api.frontend.control_tokens import control_tokens
from flashserve.api.frontend.disaggregated_params import unknown_context_error
from flashserve.api.frontend.generation import GenerationRequest, Generator
from flashserve.api.frontend.options import GenerationOptions
from flashserve.api.frontend.output.output_plan import OutputFormats, ParsingPlan
from flashserve.api.frontend.output.reasoning import END as THINK_END
from flashserve.api.frontend.output.text_output import Piece
from flashserve.api.frontend.params import ModelDefaults, to_sampling_params
from flashserve.api.frontend.prompt import encode_prompt
from flashserve.api.frontend.structured.response_format import StructuredOutputs
from flashserve.api.frontend.structured.tool_grammar import ToolGrammars
from flashserve.api.frontend.template_jail import render_isolated
from flashserve.api.frontend.thinking_budget import ThinkingBudget
from flashserve.api.http.errors import RequestError
from flashserve.engine.async_engine import AsyncEngine

T = TypeVar("T")


class ModelFrontend:
    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer: Any,
        served_model_name: str,
        defaults: ModelDefaults,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.served_model_name = served_model_name
        self.defaults = defaults
        self.max_model_len = engine.engine.max_model_len
        self.vocab_size = engine.engine.model_config.vocab_size
        self.structured = StructuredOutputs(tokenizer, self.vocab_size, engine.engine.eos_token_ids)
        config = engine.engine.config
        self.formats = OutputFormats(tokenizer, config.tool_call_parser, config.reasoning_parser)
        self.tool_grammars = ToolGrammars(tokenizer, self.structured)
        self.request_timeout_s = getattr(config, "request_timeout_s", None)
        self.generator = Generator(engine, tokenizer)
        # Built now, so that a request template's forked render finds it ready.
        control_tokens(tokenizer)
        # No token spans more characters than the longest vocabulary entry, so a prompt
        # longer than this cannot fit the context: refused before tokenizing (which
        # costs about a second per megabyte).
        self.max_prompt_chars = self.max_model_len * _max_token_chars(tokenizer)
        # Requests with their own chat template wait up to seconds on a jailed render;
        # they get threads of their own so they can never occupy the shared pool.
        self._template_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="template")

    async def off_loop(self, call: Callable[[], T], *, own_template: bool = False) -> T:
        """Run `call` on a worker thread: validating, rendering, tokenizing and compiling
        grammars take a while, and the streams of other requests must keep flowing."""
        pool = self._template_pool if own_template else None  # None: asyncio's default pool
        context = contextvars.copy_context()  # Truss's request-id log context, as to_thread does
        return await asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(context.run, call)
        )

    def render_own_template(self, render: Callable[[], str]) -> str:
        """A prompt rendered by the request's own template: in a forked child under CPU,
        memory and time limits, since a template can loop or allocate without bound."""
        return render_isolated(render, max_chars=self.max_prompt_chars)

    def tokenize(self, text: str, options: GenerationOptions, param: str) -> list[int]:
        """The prompt's token ids, cut to truncate_prompt_tokens; `param` names the field
        that holds the prompt, for the error when it cannot fit the context."""
        if not options.truncate_prompt_tokens and len(text) > self.max_prompt_chars:
            raise RequestError(
                f"The prompt is {len(text)} characters long, more than this model's "
                f"{self.max_model_len}-token context can hold. Shorten the {param} or set "
                "truncate_prompt_tokens.",
                param=param,
                code="context_length_exceeded",
            )
        prompt_ids = encode_prompt(self.tokenizer, text, options.add_special_tokens)
        if options.truncate_prompt_tokens and len(prompt_ids) > options.truncate_prompt_tokens:
            prompt_ids = prompt_ids[-options.truncate_prompt_tokens :]
        return prompt_ids

    def build(
        self,
        options: GenerationOptions,
        request_id: str,
        prompt: str,
        prompt_ids: list[int],
        chat_template: str | None = None,
        prompt_param: str = "messages",
        raw_text: bool = False,
        thinking_budget: int | None = None,
    ) -> GenerationRequest:
        """The request's output plan, grammar and SamplingParams (built here, once).

        `prompt` is the rendered text (its open or closed thinking block decides how the
        output is parsed); `chat_template` is the request's own template, if any;
        `prompt_param` names the field holding the prompt (for errors); `raw_text` keeps
        the output as generated, with no reasoning or tool-call split (completions);
        `thinking_budget` caps the tokens spent thinking (frontend/thinking_budget.py; no
        effect on a model whose reasoning is not split). Blocking (grammars compile here):
        call it off the event loop.
        """
        tools, parsing, banned = self.formats.prepare(options, prompt, chat_template)
        if raw_text:
            parsing = ParsingPlan()
        # With thinking on, response_format constrains the answer after the thinking block.
        grammar = self.structured.grammar_for(options.response_format, parsing.thinking)
        if tools.constrained:  # tool_choice required or named: forced calls
            grammar = self.tool_grammars.compile(
                parsing.tool_parser, tools, parsing.thinking, parsing.keep_special_ids
            )
        params = to_sampling_params(
            options,
            self.defaults,
            prompt_len=len(prompt_ids),
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            tokenizer=self.tokenizer,
            grammar=grammar,
            banned_token_ids=banned,
            prompt_param=prompt_param,
        )
        handle = params.disaggregated.handle if params.disaggregated else None
        if handle is not None and not self.engine.engine.contexts.contains(handle):
            raise unknown_context_error(handle)
        request = GenerationRequest(
            request_id=request_id,
            options=options,
            prompt_ids=prompt_ids,
            params=params,
            parsing=parsing,
        )
        if thinking_budget is not None and parsing.thinking is not None:
            resume = functools.partial(
                self._answer_after_thinking, request, prompt, chat_template, prompt_param
            )
            request.thinking_budget = ThinkingBudget(thinking_budget, self._think_end_ids(), resume)
        return request

    async def _answer_after_thinking(
        self,
        request: GenerationRequest,
        prompt: str,
        chat_template: str | None,
        prompt_param: str,
        output_ids: list[int],
        max_tokens: int,
    ) -> GenerationRequest | None:
        """The request that continues `request` once its thinking was ended for it: the
        prompt followed by the output so far, at most `max_tokens` more, parsed and
        constrained as a prompt whose thinking is closed. None when no context is left."""
        prompt_ids = request.prompt_ids + output_ids
        if len(prompt_ids) >= self.max_model_len:
            return None
        options = request.options.model_copy(
            update={
                "max_tokens": max_tokens,
                "min_tokens": max(0, request.options.min_tokens - len(output_ids)),
            }
        )
        text = prompt + self.tokenizer.decode(output_ids, skip_special_tokens=False)
        return await self.off_loop(
            functools.partial(
                self.build,
                options,
                f"{request.request_id}-answer",
                text,
                prompt_ids,
                chat_template=chat_template,
                prompt_param=prompt_param,
            )
        )

    def _think_end_ids(self) -> tuple[int, ...]:
        single = self.formats.single_tokens((THINK_END,))
        if single:
            return tuple(single)
        return tuple(self.tokenizer.encode(THINK_END, add_special_tokens=False))

    def generate(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        return self.generator.generate(request)


def _max_token_chars(tokenizer: Any) -> int:
    """Characters the longest token can decode to, doubled for normalizers; 64 if unknown."""
    try:
        longest = max(len(token) for token in tokenizer.get_vocab())
    except Exception:  # noqa: BLE001 - a tokenizer without a plain vocabulary
        return 64
    # Byte-level BPE keys hold one character per byte and SentencePiece keys one per
    # character, so a key is never shorter than its text.
    return 2 * max(longest, 1)
