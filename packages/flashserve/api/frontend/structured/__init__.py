"""Grammars that constrain output: response_format and forced tool calls."""
