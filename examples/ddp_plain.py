"""A hand-written DDP loop with gradient accumulation, guarded by one line; runs on two CPU processes.

What DDP itself would say here is nothing: with ``find_unused_parameters=True`` a layer that no rank calls simply
keeps a None gradient, and a layer only rank 0 calls is averaged into every rank's ``.grad`` at the synchronizing
micro-batch, so no single process can tell it was missing on rank 1. GradGuard combines what every rank's
backward passes reached (one ``all_reduce`` per logging step) and reports, from rank 0:

* ``unused.weight`` / ``unused.bias``: no gradient at any step, on any rank (cause ``unused``, with the line);
* ``expert.weight`` / ``expert.bias``: a gradient at every step, but never from rank 1 (the
  ``distributed.rank_dependent`` section of the report names the rank and counts the micro-batches).

Run it with torchrun (gloo on the CPU; no GPU needed), or plainly, in which case it starts its two processes
itself::

    torchrun --nproc_per_node=2 examples/ddp_plain.py
    python examples/ddp_plain.py
    gradguard report runs/ddp_plain       # the report again, from the log directory
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lightning_gradguard import watch

ACCUMULATE = 4  # micro-batches per optimizer step
STEPS = 6


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)
        self.expert = nn.Linear(16, 1)  # routed to on rank 0's data only
        self.unused = nn.Linear(16, 1)  # the planted bug: never called

    def forward(self, x: torch.Tensor, use_expert: bool) -> torch.Tensor:
        h = torch.tanh(self.encoder(x))
        out = self.head(h)
        if use_expert:
            out = out + self.expert(h)
        return out


def main() -> None:
    dist.init_process_group("gloo")  # torchrun (or spawn_two below) sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(Net(), find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    guard = watch(model, optimizer, log_dir="runs/ddp_plain", log_every_n_steps=2, summary=False)  # the one line

    generator = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        for micro_batch in range(ACCUMULATE):
            x, y = torch.randn(4, 8, generator=generator), torch.randn(4, 1, generator=generator)
            last = micro_batch == ACCUMULATE - 1
            # the usual accumulation under DDP: gradients are all-reduced only at the window's last micro-batch
            with nullcontext() if last else model.no_sync():
                loss = F.mse_loss(model(x, use_expert=rank == 0), y) / ACCUMULATE
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    report = guard.close()  # on every rank: the final counts become global (a collective)
    if rank == 0:
        print(report.summary())
        print("missing:", report.missing)
        for name, where in report.to_dict()["distributed"]["rank_dependent"].items():
            print(f"rank-dependent: {name} received no gradient on ranks {where['ranks']} "
                  f"in {where['micro_batches']} micro-batches")
    dist.destroy_process_group()


def _spawned(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    main()


def spawn_two() -> None:
    """Without torchrun: start the two processes here, the way torchrun would."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(port,), nprocs=2)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "RANK" in os.environ:  # launched by torchrun
        main()
    else:
        spawn_two()
