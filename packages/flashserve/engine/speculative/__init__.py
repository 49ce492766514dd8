"""Speculative decoding: n-gram drafts verified in the ordinary step (see verify.py)."""
