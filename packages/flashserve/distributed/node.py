"""The ranks of one node other than node 0 in a multi-node tensor-parallel deployment.

    python -m flashserve.distributed.node --config config.yaml --model-dir /app/model_cache/x

Node 0 runs the Truss server (rank 0 and its node's other ranks). Every other
node runs this: it starts that node's LOCAL_WORLD_SIZE ranks, from
NODE_RANK * LOCAL_WORLD_SIZE on, as worker processes that rendezvous through
torch.distributed's env:// (MASTER_ADDR, MASTER_PORT, WORLD_SIZE) and follow
rank 0's steps; it exits when they do (rank 0 shut down or one of them died).
Not run in this repository's tests (one machine, no GPUs): docs/DESIGN.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from flashserve.config import EngineConfig
from flashserve.distributed.parallel_state import rendezvous
from flashserve.distributed.workers import WATCH_INTERVAL_S, RankGroup, WorkerSpec, worker_specs
from flashserve.engine.dtype_choice import DTYPES
from flashserve.models.model_config import ModelConfig

logger = logging.getLogger(__name__)


def node_specs(config: EngineConfig, model_dir: Path) -> list[WorkerSpec]:
    """This node's ranks (all of them: none lives in a Truss process here)."""
    size = config.tensor_parallel_size or int(os.environ["WORLD_SIZE"])
    where = rendezvous(size, config.tensor_parallel_port)
    if not where.multi_node or where.first_rank == 0:
        raise ValueError(
            "run on nodes other than node 0, with MASTER_ADDR, MASTER_PORT, WORLD_SIZE, "
            "NODE_RANK (> 0) and LOCAL_WORLD_SIZE set"
        )
    mc = ModelConfig.from_pretrained(model_dir)
    # As rank 0 decides them on GPUs: bf16 for `auto`, the same context length.
    dtype = DTYPES["bfloat16" if config.dtype == "auto" else config.dtype]
    max_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    return worker_specs(
        where,
        range(where.local_size),
        model_dir,
        config,
        dtype,
        "cuda",
        max_len,
        mc.eos_token_ids,
        config.engine_stall_timeout_s or 300.0,
        cpu_threads=1,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the deployment's config.yaml")
    parser.add_argument("--model-dir", type=Path, required=True, help="the weights folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    truss_config = yaml.safe_load(args.config.read_text())
    engine = (truss_config.get("model_metadata") or {}).get("engine")
    group = RankGroup(node_specs(EngineConfig.from_dict(engine), args.model_dir))
    group.wait_loaded(EngineConfig.from_dict(engine).tensor_parallel_load_timeout_s)
    logger.info("node ranks loaded: pids %s", group.pids)
    while all(p.is_alive() for p in group.processes):
        time.sleep(WATCH_INTERVAL_S)
    group.kill()  # one ended: the group is over
    return 0 if all(p.exitcode == 0 for p in group.processes) else 1


if __name__ == "__main__":
    sys.exit(main())
