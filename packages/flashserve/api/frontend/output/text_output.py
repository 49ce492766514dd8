"""The one owner of a request's text output: engine outputs in, text pieces out.

Every endpoint's output passes through here, so it is decided in one place how tokens
become text (detokenizer), where the text ends (stop strings, counted from the
min_tokens-th token on), what is reasoning or a tool call (parsers) and why it ended
(finish reason). Endpoint formatters only reshape the pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flashserve.api.frontend.options import GenerationOptions
from flashserve.api.frontend.output.detokenizer import IncrementalDetokenizer
from flashserve.api.frontend.output.output_plan import ParsingPlan
from flashserve.api.frontend.output.response_parser import ParsedStep
from flashserve.api.frontend.output.stop import StopStringMatcher
from flashserve.api.frontend.output.token_text import TokenText


@dataclass
class Piece:
    """One step of a request's output, as text."""

    text: str
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    # context_only: the response's top-level `disaggregated_params` (the handle).
    disaggregated: dict | None = None
    # Thinking text (reasoning_content) and tool-call deltas read from this step's text.
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    reasoning_tokens: int = 0


class TextOutput:
    """Turns one request's engine outputs, step by step, into Pieces."""

    def __init__(
        self,
        tokenizer: Any,
        token_text: TokenText,
        options: GenerationOptions,
        prompt_ids: list[int],
        parsing: ParsingPlan,
    ) -> None:
        self.options = options
        self.token_text = token_text
        self.detokenizer = IncrementalDetokenizer(
            tokenizer,
            prompt_ids=prompt_ids,
            skip_special_tokens=options.skip_special_tokens,
            spaces_between_special_tokens=options.spaces_between_special_tokens,
            keep_special_ids=parsing.keep_special_ids,
        )
        # Splits reasoning and tool calls off the text (passes it through when neither).
        self.parser = parsing.new_parser()
        self.stops = StopStringMatcher(options.stop_strings, options.include_stop_str_in_output)
        self.completion_tokens = 0

    def step(self, out: Any) -> Piece:
        """One engine output (a SequenceOutput) -> its piece; `finish_reason` set on the last.

        Where something decided token by token may change inside an output of several
        tokens (gathered by stream_interval, or by a consumer that fell behind), the
        output is taken a token at a time and its pieces joined, so that the result does
        not depend on how the outputs were gathered: while a reasoning block may open or
        close (reasoning_tokens), before min_tokens (stop strings count from there), and
        while a stop string or the last allowed tool call may end the text
        (completion_tokens then end at its token)."""
        parser = self.parser
        if len(out.new_token_ids) <= 1 or not (
            parser.may_think
            or parser.may_exhaust
            or self.completion_tokens < self.options.min_tokens
            or self.stops.watching
        ):
            return self._step(out)
        joined: Piece | None = None
        for part in out.one_token_each():
            piece = self._step(part)
            joined = piece if joined is None else _joined(joined, piece)
            if piece.finish_reason is not None:
                # The text ended inside the output: the tokens after that one were
                # never part of it, however many the engine had made by then.
                break
        assert joined is not None
        return joined

    def _step(self, out: Any) -> Piece:
        options = self.options
        ids = out.new_token_ids
        self.completion_tokens += len(ids)
        # A stop token (EOS or stop_token_ids) ends the text without being part of it.
        stopped_by_token = out.finish_reason == "stop" and not options.include_stop_str_in_output
        text = self.detokenizer.add_tokens(ids[:-1] if stopped_by_token else ids)
        if out.finished:
            text += self.detokenizer.flush()
        if self.completion_tokens < options.min_tokens:
            # "Minimum number of tokens to generate before stopping": a stop string
            # counts from the min_tokens-th token on (vLLM's rule too).
            emitted, matched = text, None
        else:
            emitted, matched = self.stops.feed(text)
        if out.finished and matched is None:
            emitted += self.stops.flush()
            # A stop that could only be confirmed at the end still counts.
            matched = self.stops.matched
        parser = self.parser
        parsed = parser.feed(emitted, len(ids))
        if matched is not None or out.finished or parser.exhausted:
            parsed.extend(parser.finish())
        piece = Piece(
            text=parsed.content,
            logprobs=self._logprob_entries(out),
            prompt_tokens=out.num_prompt_tokens,
            cached_tokens=out.num_cached_tokens,
            completion_tokens=self.completion_tokens,
            reasoning=parsed.reasoning,
            tool_calls=parsed.tool_calls,
            reasoning_tokens=parser.reasoning_tokens,
        )
        if matched is not None:
            piece.finish_reason, piece.stop_reason = "stop", matched
        elif out.finished:
            piece.finish_reason, piece.stop_reason = out.finish_reason, out.stop_reason
        elif parser.exhausted:
            # parallel_tool_calls false (or a named function): the one call is
            # complete, so generation stops here; the loop leaving aborts it.
            piece.finish_reason = "tool_calls"
        if piece.finish_reason == "stop" and parser.called_tools:
            piece.finish_reason = "tool_calls"
        return piece

    def _logprob_entries(self, out: Any) -> list[dict] | None:
        options = self.options
        if not options.logprobs or not out.logprobs:
            return None
        return [
            # The engine may hold more alternatives than asked (context_only keeps 20).
            self.token_text.entry(
                lp.token_id,
                lp.logprob,
                lp.top[: options.top_logprobs],
                with_top=options.top_logprobs > 0,
            )
            for lp in out.logprobs
        ]


def _joined(first: Piece, then: Piece) -> Piece:
    """Two consecutive pieces of one output as one (the later one's counts and finish)."""
    logprobs = first.logprobs
    if then.logprobs is not None:
        logprobs = (logprobs or []) + then.logprobs
    return Piece(
        text=first.text + then.text,
        logprobs=logprobs,
        finish_reason=then.finish_reason,
        stop_reason=then.stop_reason,
        completion_tokens=then.completion_tokens,
        prompt_tokens=then.prompt_tokens,
        cached_tokens=then.cached_tokens,
        disaggregated=then.disaggregated or first.disaggregated,
        reasoning=first.reasoning + then.reasoning,
        tool_calls=_deltas_joined(first.tool_calls, then.tool_calls),
        reasoning_tokens=then.reasoning_tokens,
    )


def _deltas_joined(first: list[dict], then: list[dict]) -> list[dict]:
    """Tool-call deltas of two pieces as one piece's (a call's arguments in one delta)."""
    joined = ParsedStep(tool_calls=first)
    joined.extend(ParsedStep(tool_calls=then))
    return joined.tool_calls
