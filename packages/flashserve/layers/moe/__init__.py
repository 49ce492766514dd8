"""Mixture-of-experts feed-forward: routers pick experts per token, stacked experts compute them."""

from flashserve.layers.moe.block import SparseMoeBlock
from flashserve.layers.moe.experts import StackedExperts
from flashserve.layers.moe.router import GroupedSigmoidRouter, SoftmaxTopKRouter

__all__ = ["GroupedSigmoidRouter", "SoftmaxTopKRouter", "SparseMoeBlock", "StackedExperts"]
