"""Worker processes for tests/test_torch.py (torch.multiprocessing.spawn needs importable functions).

Each worker joins a gloo process group (a FileStore under the test's tmp
directory), trains a converted copy of :class:`Net` on its own data and
saves what the test compares (``torch.save`` into the same directory).  The
test computes the reference in its own process: ONE plain torch model on
the concatenated batches.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

WORLD = 2
#: Rows per rank: unequal on purpose (the global statistics must weigh them).
BATCH = (5, 3)


class Net(nn.Module):
    """A small CNN: BatchNorm2d (default), BatchNorm2d (momentum=None), BatchNorm1d (affine=False)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8, momentum=None)
        self.fc1 = nn.Linear(8, 12)
        self.bn3 = nn.BatchNorm1d(12, affine=False)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.fc1(x.mean((2, 3)))))
        return self.fc2(x)


def make_net() -> Net:
    torch.manual_seed(0)  # every rank and the reference start from the same parameters
    return Net()


def batch(rank: int, step: int):
    """Rank ``rank``'s images and targets of ``step``: its own distribution."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH[rank], 3, 6, 6, generator=gen) * (1.0 + rank) + (2.0 * rank - 1.0)
    return x, torch.randn(BATCH[rank], 3, generator=gen)


def eval_batch():
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(99)) + 0.5


def _join(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    for name in ("NORMSVC_RUN", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        os.environ.pop(name, None)  # the run comes from rank 0, through torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'pg')}", rank=rank,
                            world_size=WORLD)


def _train_sync(model, rank: int, steps: int, dtype) -> dict:
    """``steps`` DDP steps of a converted model in ``dtype``; what the test compares."""
    total = sum(BATCH)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    out = {"steps": []}
    for step in range(steps):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        x, t = (a.to(dtype) for a in batch(rank, step))
        x.requires_grad_(True)
        y = ddp(x)
        # DDP averages gradients over the ranks: scaled by WORLD, they are those of the mean over the
        # concatenated batch
        loss = (y * t).sum() * WORLD / total
        opt.zero_grad()
        loss.backward()
        out["steps"].append({"params": params, "y": y.detach(), "x_grad": x.grad / WORLD,
                             "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
        opt.step()
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        out["eval"] = model(eval_batch().to(dtype))
    return out


def sync_worker(rank: int, address: str, tmp: str, steps: int) -> None:
    """Sync mode under DDP, in float32 and float64; then a rank dies between forward and backward."""
    import normsvc
    import normsvc.torch as nt

    _join(rank, tmp)
    with normsvc.Client(address) as client:
        out = {}
        for dtype, prefix in ((torch.float32, "sync/"), (torch.float64, "sync64/")):
            model = nt.convert(make_net().to(dtype), client, mode="sync", prefix=prefix)
            out[prefix] = _train_sync(model, rank, steps, dtype)
            out[prefix]["run"] = nt.binding(model).run

        # a rank that dies mid-step: the survivor's backward reduction times out, it does not hang
        small = nt.convert(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), client, prefix="dead/", timeout=2.0)
        y = small(torch.randn(4, 4, generator=torch.Generator().manual_seed(rank)))
        if rank == 0:
            start = time.monotonic()
            try:
                y.square().sum().backward()
                out["dead"] = ("no error", "", 0.0)
            except Exception as exc:  # noqa: BLE001 - the test checks what it was
                out["dead"] = (type(exc).__name__, str(exc), time.monotonic() - start)
        torch.save(out, os.path.join(tmp, f"sync{rank}.pt"))
    if rank == 0:
        dist.destroy_process_group()
    else:
        os._exit(0)  # dies: no backward, no goodbye to the process group


def shared_worker(rank: int, address: str, tmp: str, steps: int) -> None:
    """Shared mode: one model against the server (DDP, trained), one against a sqlite file (forward only)."""
    import normsvc
    import normsvc.torch as nt

    _join(rank, tmp)
    total = sum(BATCH)
    store = normsvc.Store.open(f"sqlite:///{os.path.join(tmp, 'stats.db')}")
    with normsvc.Client(address) as client:
        served = nt.convert(make_net(), client, mode="shared", prefix="shared/")
        filed = nt.convert(make_net(), store, mode="shared", prefix="filed/")
        inputs = {"served": {}, "filed": {}}
        for key, model in (("served", served), ("filed", filed)):
            for path, m in model.named_modules():
                if isinstance(m, nt.BatchNorm):
                    m.register_forward_pre_hook(
                        lambda mod, args, key=key, path=path: inputs[key].setdefault(path, []).append(
                            args[0].detach().clone()) if mod.training else None)
        ddp = nn.parallel.DistributedDataParallel(served)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(steps):
            x, t = batch(rank, step)
            loss = (ddp(x) * t).sum() * WORLD / total
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                filed(x)
        nt.flush(served)
        nt.flush(filed)
        dist.barrier()  # every rank's steps are in: eval fetches all of them
        served.eval()
        filed.eval()
        out = {"inputs": inputs}
        with torch.no_grad():
            for key, model in (("served", served), ("filed", filed)):
                y = model(eval_batch())
                plain = Net()
                plain.load_state_dict(model.state_dict(), strict=True)  # the same keys both ways
                plain.eval()
                out[key] = {"eval": y, "plain_eval": plain(eval_batch()),
                            "state": {k: v.clone() for k, v in model.state_dict().items()}}
        nt.close(served)
        nt.close(filed)
        torch.save(out, os.path.join(tmp, f"shared{rank}.pt"))
    store.close()
    dist.destroy_process_group()


def device_sync_worker(rank: int, address: str, tmp: str, steps: int, device: str) -> None:
    """Sync mode on ``device`` in float64, one process per rank and no process group (rank and world size
    given): the backward runs where autograd runs it (on CUDA, autograd's thread for the device, which
    reduces on a stream of its own).  Saves each step's output and gradients and the final buffers."""
    import normsvc
    import normsvc.torch as nt

    torch.set_num_threads(1)
    total = sum(BATCH)
    with normsvc.Client(address) as client:
        model = nt.convert(make_net().to(device=device, dtype=torch.float64), client, prefix=f"procs-{device}/",
                           rank=rank, world_size=WORLD, run=f"procs-{device}", timeout=30.0)
        out = {"steps": []}
        for step in range(steps):
            x, t = (a.to(device=device, dtype=torch.float64) for a in batch(rank, step))
            x.requires_grad_(True)
            model.zero_grad(set_to_none=True)
            y = model(x)
            ((y * t).sum() / total).backward()
            out["steps"].append({"y": y.detach().cpu(), "x_grad": x.grad.cpu(),
                                 "grads": {n: p.grad.cpu() for n, p in model.named_parameters()}})
        out["state"] = {k: v.cpu() for k, v in model.state_dict().items()}
        nt.close(model)
    torch.save(out, os.path.join(tmp, f"{device}-sync{rank}.pt"))
