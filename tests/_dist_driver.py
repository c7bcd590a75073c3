"""Small multi-rank jobs for tests/test_distributed.py, started as torchrun would (helpers_processes.Ranks).

    python tests/_dist_driver.py sync OUT     one train_step per rank on its slice of a fixed global batch;
                                              writes the codebook gradient it used (sparse exchange) and the
                                              dense all-reduce of the same gradient to OUT/rank<r>.pt
    python tests/_dist_driver.py timeout      rank 1 is late for a barrier inside a named phase
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.stages.distributed import CollectiveTimeoutError, distributed
from revq_pipe.stages.train_loop import TrainParts, build_optimizer, train_step

SHAPE, TOKENS, CODES, GLOBAL_BATCH = (4, 2, 3), 6, 5, 12


def global_problem():
    """The same quantizer and global batch on every rank (and in the test)."""
    generator = torch.Generator().manual_seed(7)
    quantizer = MultiGroupQuantizer(SHAPE, TOKENS, CODES)
    with torch.no_grad():
        quantizer.codebooks.copy_(torch.randn(quantizer.codebooks.shape, generator=generator))
    batch = torch.randn(GLOBAL_BATCH, *SHAPE, generator=generator)
    return quantizer, batch


def parts_for(quantizer: MultiGroupQuantizer) -> TrainParts:
    optimizer = build_optimizer(quantizer.codebooks, [], codebook_lr=1e-2, codebook_weight_decay=0.0,
                                rectifier_lr=0.0, rectifier_weight_decay=0.0)
    identity = torch.nn.Identity()
    return TrainParts(normalizer=LatentNormalizer(torch.zeros(SHAPE), torch.ones(SHAPE)), quantizer=quantizer,
                      rectifier=identity, rectify=identity, optimizer=optimizer, train_rectifier=False,
                      grad_clip=0.0, precision="fp32")


def sync(out: Path) -> None:
    with distributed("cpu") as ctx:
        quantizer, batch = global_problem()
        share = GLOBAL_BATCH // ctx.world_size
        mine = batch[ctx.rank * share:(ctx.rank + 1) * share]
        train_step(parts_for(quantizer), mine, ctx)
        sparse = quantizer.codebooks.grad.clone()
        # the dense baseline: this rank's own gradient (normalised by the global batch), all-reduced
        quantizer, _ = global_problem()
        z = mine.reshape(share, TOKENS, -1)
        loss = torch.nn.functional.mse_loss(quantizer.lookup(quantizer.nearest(z)), z, reduction="sum")
        (loss / (GLOBAL_BATCH * z[0].numel())).backward()
        dense = ctx.all_reduce_sum_(quantizer.codebooks.grad.clone())
        torch.save({"sparse": sparse, "dense": dense}, out / f"rank{ctx.rank}.pt")


def late_rank() -> None:
    with distributed("cpu", timeout_minutes=0.05) as ctx:  # 3 s
        try:
            with ctx.phase("assemble the store"):
                if ctx.rank == 1:
                    time.sleep(8)
                ctx.barrier()
        except CollectiveTimeoutError as error:
            print(error, file=sys.stderr)
            sys.exit(3)


if __name__ == "__main__":
    if sys.argv[1] == "sync":
        sync(Path(sys.argv[2]))
    else:
        late_rank()
