"""The shared generation loop: a prepared request -> the engine -> text pieces.

Every endpoint prepares a `GenerationRequest` (frontend/model_frontend.py builds it)
and consumes the pieces `Generator.generate` yields; the loop itself only keeps the
metrics and the request log, and leaves the text to `TextOutput`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from flashserve.api.frontend.disaggregated_params import handle_body
from flashserve.api.frontend.options import GenerationOptions
from flashserve.api.frontend.output.output_plan import ParsingPlan
from flashserve.api.frontend.output.text_output import Piece, TextOutput
from flashserve.api.frontend.output.token_text import TokenText
from flashserve.api.frontend.thinking_budget import ThinkingBudget
from flashserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineOverloadedError,
    RequestTimeoutError,
)
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import SequenceOutput
from flashserve.metrics import (
    GENERATED_TOKENS,
    ITL,
    PROMPT_TOKENS,
    REQUEST_SECONDS,
    REQUESTS,
    TTFT,
)

logger = logging.getLogger("flashserve.requests")

# Client-chosen strings that reach the log are clipped: a log line must stay a line.
LOG_FIELD_CHARS = 128


@dataclass
class GenerationRequest:
    """Everything the loop needs for one request, whichever endpoint it came through."""

    request_id: str
    options: GenerationOptions
    prompt_ids: list[int]
    params: SamplingParams
    # How the output is parsed (reasoning, tool calls) and which special tokens it shows.
    parsing: ParsingPlan = field(default_factory=ParsingPlan)
    created: int = field(default_factory=lambda: int(time.time()))
    # time.monotonic() past which the request is aborted (None: no deadline).
    deadline: float | None = None
    # A cap on the tokens spent thinking (frontend/thinking_budget.py); None: no cap.
    thinking_budget: ThinkingBudget | None = None


class Generator:
    """Runs requests on the engine and turns their outputs into pieces (one per model)."""

    def __init__(self, engine: AsyncEngine, tokenizer: Any) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.token_text = TokenText(tokenizer)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        """Engine outputs -> pieces; the last one carries the finish reason. Leaving early
        (the consumer closes the iterator) aborts the engine request."""
        output = TextOutput(
            self.tokenizer, self.token_text, request.options, request.prompt_ids, request.parsing
        )
        budget = request.thinking_budget
        started = time.monotonic()
        first_token_at = None
        last_token_at = started
        PROMPT_TOKENS.inc(len(request.prompt_ids))
        finish_reason = None
        # How a request that did not finish ended; "aborted" means its consumer left.
        outcome = "aborted"
        # The engine request running now: `request`, or its continuation once a thinking
        # budget ended the thinking (its prompt holds the output so far).
        running: GenerationRequest | None = request
        generated: list[int] = []  # the output's token ids (with a budget only)
        cached = 0
        try:
            while running is not None:
                outputs = self.engine.generate(
                    running.request_id,
                    running.prompt_ids,
                    running.params,
                    deadline=request.deadline,
                )
                try:
                    async for out in outputs:
                        now = time.monotonic()
                        if first_token_at is None:
                            first_token_at = now
                            TTFT.observe(now - started)
                            cached = out.num_cached_tokens
                        else:
                            # Outputs may carry several tokens (stream_interval, a late
                            # consumer): each token is one observation of the mean gap.
                            n = len(out.new_token_ids)
                            for _ in range(n):
                                ITL.observe((now - last_token_at) / n)
                        last_token_at = now
                        GENERATED_TOKENS.inc(len(out.new_token_ids))
                        if running is not request:  # usage counts the request's own prompt
                            out = replace(
                                out,
                                num_prompt_tokens=len(request.prompt_ids),
                                num_cached_tokens=cached,
                            )
                        # With a budget, token by token: it may run out inside an output.
                        parts = [out] if budget is None else out.one_token_each()
                        spent = False
                        for part in parts:
                            piece = output.step(part)
                            if part.context_handle is not None:
                                piece.disaggregated = handle_body(
                                    part.context_handle, part.new_token_ids
                                )
                            finish_reason = piece.finish_reason
                            yield piece
                            if piece.finish_reason is not None:
                                return
                            if budget is not None:
                                generated.extend(part.new_token_ids)
                                spent = budget.spent(output.parser)
                                if spent:
                                    break
                        if spent:
                            break  # end this engine request; the tokens after are dropped
                finally:
                    await outputs.aclose()  # aborts the engine request if it still runs
                running = None
                if budget is not None and budget.spent(output.parser):
                    piece, running = await self._end_thinking(request, output, generated, cached)
                    finish_reason = piece.finish_reason
                    yield piece
        except EngineOverloadedError:
            outcome = "overloaded"
            raise
        except RequestTimeoutError:
            outcome = "timeout"
            raise
        except EngineDeadError:
            outcome = "engine_error"
            raise
        except ValueError:  # the engine refused the request (a 400)
            outcome = "rejected"
            raise
        finally:
            REQUESTS.labels(finish_reason or outcome).inc()
            REQUEST_SECONDS.observe(time.monotonic() - started)
            _log_done(
                request, started, first_token_at, output.completion_tokens, finish_reason or outcome
            )

    async def _end_thinking(
        self,
        request: GenerationRequest,
        output: TextOutput,
        generated: list[int],
        cached: int,
    ) -> tuple[Piece, GenerationRequest | None]:
        """Close the thinking block as the model would, then the request that continues
        the answer (None, with a "length" piece, when no tokens or context are left)."""
        budget = request.thinking_budget
        assert budget is not None
        close = list(budget.close_ids)
        generated.extend(close)
        left = request.params.max_tokens - output.completion_tokens - len(close)
        resumed = await budget.resume(list(generated), left) if left > 0 else None
        piece = output.step(
            SequenceOutput(
                request.request_id,
                close,
                finished=resumed is None,
                finish_reason="length" if resumed is None else None,
                num_prompt_tokens=len(request.prompt_ids),
                num_cached_tokens=cached,
            )
        )
        return piece, resumed


def _log_done(
    request: GenerationRequest,
    started: float,
    first_token_at: float | None,
    tokens: int,
    finish: str | None,
) -> None:
    now = time.monotonic()
    logger.info(
        "request done",
        extra={
            "request_id": request.request_id,
            "user": (request.options.user or "")[:LOG_FIELD_CHARS] or None,
            "prompt_tokens": len(request.prompt_ids),
            "completion_tokens": tokens,
            "ttft_ms": round((first_token_at - started) * 1000, 1) if first_token_at else None,
            "total_ms": round((now - started) * 1000, 1),
            "finish_reason": finish or "aborted",
        },
    )
