"""Where this process stands in a torchrun job, read from the environment torchrun gives every rank.

The one reader of RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE: the console (which prints on rank 0
only) and the process group (stages/distributed.py) both ask here. Imports nothing heavy, so the CLI
can use it before torch is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch() -> Launch:
    """This process's place in the job (a single process when torchrun did not start it)."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", None)):
        text = os.environ.get(name)
        try:
            values[name] = int(text) if text is not None else default
        except ValueError:
            raise ValueError(f"the environment variable {name}={text!r} is not an integer; it is set by torchrun, "
                             "unset it when not running under torchrun") from None
    world = values["WORLD_SIZE"]
    local_world = values["LOCAL_WORLD_SIZE"] if values["LOCAL_WORLD_SIZE"] is not None else world
    if not (world >= 1 and 0 <= values["RANK"] < world and 0 <= values["LOCAL_RANK"] < max(local_world, 1)):
        raise ValueError(f"RANK={values['RANK']}, LOCAL_RANK={values['LOCAL_RANK']}, WORLD_SIZE={world}, "
                         f"LOCAL_WORLD_SIZE={local_world} do not describe a rank of a job; start the job with torchrun")
    return Launch(rank=values["RANK"], world_size=world, local_rank=values["LOCAL_RANK"], local_world_size=local_world)
