"""Tensor parallelism: the process group (parallel_state) and the worker processes (workers)."""
