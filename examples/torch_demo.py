"""Four PyTorch trainers share their BatchNorm statistics through normsvc: what `make demo` runs.

The script starts ``normsvc serve`` on the embedded store (sqlite in a
temporary directory) and spawns ``--world`` trainer processes (gloo, DDP on
CPU).  Each rank's images come from a distribution of its own: the same four
classes of patterns, seen through a "camera" with its own offset and gain
per channel.  The model is converted with :func:`normsvc.torch.convert`,
first in shared mode (each rank normalizes with its own batch, the running
statistics are shared: one step contribution per step), then in sync mode
(every rank normalizes with the statistics of all ranks' batches, exact
backward).  Then it

* prints the running statistics of the first BatchNorm (it sees the raw
  images, so its true population statistics are known in closed form: the
  mixture of the ranks' distributions) next to numpy's replay of torch's
  update over every batch the trainers saw, and next to what a plain
  BatchNorm on rank 0 alone records (what DDP without shared statistics
  keeps);
* freezes the layers in the service, shows that an update is refused, and
  runs inference on held-out data of every rank's distribution with a plain
  torch model that loads rank 0's weights and the frozen shared statistics;
* writes a plot of the running mean and variance converging, per mode, as
  the service published them (``client.watch``: one version per step);
* stops its server, and exits 1 if a shared statistic differs from numpy's
  replay by more than 1e-5 (relative, plus 1e-6 absolute), else 0.

    python examples/torch_demo.py                    # 60 steps per mode, writes docs/demo.png
    python examples/torch_demo.py --steps 4 --png /tmp/demo.png --no-progress
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import normsvc
import normsvc.torch

MODES = ("shared", "sync")
PREFIX = "demo/"
CHANNELS, SIZE, CLASSES = 3, 8, 4
MOMENTUM = 0.1  # torch's default, kept by convert()
NOISE = 0.8
#: The class patterns every rank sees (through its own camera).
TEMPLATES = np.random.default_rng(7).standard_normal((CLASSES, CHANNELS, SIZE, SIZE))
#: Agreement with numpy's replay that the script requires of the service (float32 batch statistics).
RTOL, ATOL = 1e-5, 1e-6
DEFAULT_PNG = Path(__file__).resolve().parents[1] / "docs" / "demo.png"


# --- the data: one distribution per rank -----------------------------------------------


def camera(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s per-channel offset and gain: its images are ``offset + gain * (pattern + noise)``."""
    rng = np.random.default_rng(100 + rank)
    return rng.uniform(-2.0, 3.0, CHANNELS), rng.uniform(0.5, 2.0, CHANNELS)


def batch(rank: int, step: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s images (float32, N x C x H x W) and labels of ``step``; the same in every process."""
    rng = np.random.default_rng([rank, step])
    labels = rng.integers(CLASSES, size=size)
    z = TEMPLATES[labels] + NOISE * rng.standard_normal((size, CHANNELS, SIZE, SIZE))
    offset, gain = camera(rank)
    x = offset[:, None, None] + gain[:, None, None] * z
    return x.astype(np.float32), labels.astype(np.int64)


def population(world: int) -> tuple[np.ndarray, np.ndarray]:
    """The true per-channel mean and variance of the pixels all ranks draw from (equal batch sizes).

    A pixel of channel c on rank r is ``o_r + g_r * (T[k, c, h, w] + noise)``
    with the class k uniform and the position uniform, so its mean is
    ``o_r + g_r * mean(T[:, c])`` and its variance ``g_r^2 * (var(T[:, c]) +
    NOISE^2)``; the mixture over ranks adds the spread of the ranks' means.
    """
    t_mean = TEMPLATES.mean(axis=(0, 2, 3))
    t_var = TEMPLATES.var(axis=(0, 2, 3)) + NOISE**2
    cams = [camera(r) for r in range(world)]
    means = np.array([o + g * t_mean for o, g in cams])
    variances = np.array([g**2 * t_var for _, g in cams])
    mean = means.mean(axis=0)
    return mean, variances.mean(axis=0) + ((means - mean) ** 2).mean(axis=0)


def replay(world: int, steps: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's running statistics of one process that saw every rank's batch of each step, in float64."""
    mean, var = np.zeros(CHANNELS), np.ones(CHANNELS)
    for step in range(steps):
        x = np.concatenate([batch(r, step, size)[0] for r in range(world)]).astype(np.float64)
        mean = (1 - MOMENTUM) * mean + MOMENTUM * x.mean(axis=(0, 2, 3))
        var = (1 - MOMENTUM) * var + MOMENTUM * x.var(axis=(0, 2, 3), ddof=1)
    return mean, var


class Net(nn.Module):
    """A small CNN whose first BatchNorm normalizes the raw images (its population is known)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.BatchNorm2d(CHANNELS)
        self.conv1 = nn.Conv2d(CHANNELS, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32 * (SIZE // 2) ** 2, CLASSES)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.inp(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.flatten(1))


# --- the trainers (spawned processes) ---------------------------------------------------


def trainer(rank: int, world: int, address: str, tmp: str, runs: dict, steps: int, size: int, events) -> None:
    """One rank: trains a converted Net in each mode on its own data and reports every step."""
    torch.set_num_threads(1)  # four trainers and a server share the machine
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        with normsvc.Client(address) as client:
            for mode in MODES:
                _train(mode, rank, client, tmp, runs[mode], steps, size, events)
    finally:
        dist.destroy_process_group()


def _train(mode: str, rank: int, client, tmp: str, run: str, steps: int, size: int, events) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = normsvc.torch.convert(Net(), client, mode=mode, prefix=f"{PREFIX}{mode}/", run=run, timeout=120)
    alone = nn.BatchNorm2d(CHANNELS)  # plain torch, this rank's data only: what DDP's BatchNorm keeps
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        x, labels = (torch.from_numpy(a) for a in batch(rank, step, size))
        with torch.no_grad():
            alone(x)
        loss = F.cross_entropy(ddp(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        events.put(("step", mode, rank, step, loss.item(), alone.running_mean.tolist(), alone.running_var.tolist()))
    normsvc.torch.flush(model)  # shared mode: every step sent and answered (sync: nothing to do)
    dist.barrier()  # ... on every rank: the service holds every step of every rank
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(tmp, f"{mode}.pt"))  # the keys of the plain Net
    normsvc.torch.close(model)


# --- the server and the service's history -------------------------------------------------


@contextlib.contextmanager
def serve(tmp: str, say):
    """``normsvc serve`` on a free port over sqlite in ``tmp``; yields its address, then stops it."""
    store = f"sqlite:///{os.path.join(tmp, 'stats.db')}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMSVC_")}  # its own server: no tokens, TLS
    proc = subprocess.Popen([sys.executable, "-m", "normsvc", "serve", "--port", "0", "--store", store,
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        box: list = []
        reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        line = box[0].strip() if box else ""
        if not line.startswith("normsvc serving on "):
            raise SystemExit(f"the server did not start (it printed {line!r})")
        address = line.rsplit(" ", 1)[1]
        say(f"server: normsvc serve on {address}, store {store} (pid {proc.pid})")
        yield address
    finally:
        proc.terminate()  # SIGTERM: a graceful stop
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        say(f"server stopped (exit code {code})")


class History(threading.Thread):
    """Every version the service publishes of ``names`` (WatchLayer): (num_batches, mean, variance)."""

    def __init__(self, client, names):
        super().__init__(name="demo-watch", daemon=True)
        self.points = {name: [] for name in names}
        self.error: BaseException | None = None
        self._watch = client.watch(names)  # returns once subscribed: no later version is missed

    def run(self):
        try:
            for item in self._watch:
                points = self.points[item.layer]
                if not points or item.stats.num_batches > points[-1][0]:
                    points.append((item.stats.num_batches, item.stats.mean.copy(), item.stats.variance.copy()))
        except normsvc.Cancelled:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    def applied(self, name: str) -> int:
        points = self.points[name]
        return points[-1][0] if points else 0

    def stop(self):
        self._watch.cancel()
        self.join(10)


# --- what the demo shows --------------------------------------------------------------------


def _close(got, want) -> bool:
    return bool(np.all(np.abs(np.asarray(got) - want) <= ATOL + RTOL * np.abs(want)))


def _stats_table(console, title, world, steps, pop, exact, shared, sync, alone):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("statistic")
    for heading in ("population (true)", f"numpy, all {steps * world} batches", "shared mode", "sync mode",
                    "rank 0 alone"):
        table.add_column(heading, justify="right")
    for label, k in (("mean", 0), ("var", 1)):
        for c in range(CHANNELS):
            row = (pop[k][c], exact[k][c], shared[k][c], sync[k][c], alone[k][c])
            table.add_row(f"{label}[{c}]", *(f"{v:.7g}" for v in row))
    console.print(table)


def _accuracy(model, rank: int, size: int = 512) -> float:
    x, labels = batch(rank, 1_000_000, size)  # held out: a step no trainer ran
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((predicted == labels).mean())


def plot(path: Path, history: History, pop, alone_history: dict, steps: int, world: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, len(MODES), figsize=(11, 6.8), sharex=True, sharey="row")
    colors = ("tab:blue", "tab:orange", "tab:green")
    for col, mode in enumerate(MODES):
        points = history.points[f"{PREFIX}{mode}/inp"]
        served = [p[0] for p in points]
        local = np.array([a for a in alone_history[mode]])  # (step, mean or var, channel)
        for row, label in enumerate(("running mean", "running variance")):
            ax = axes[row][col]
            mine = np.array([p[1 + row] for p in points])
            for c in range(CHANNELS):
                ax.plot(served, mine[:, c], color=colors[c], lw=2)
                ax.plot(range(1, len(local) + 1), local[:, row, c], color=colors[c], lw=1, ls=":")
                ax.axhline(pop[row][c], color=colors[c], lw=1, ls="--", alpha=0.8)
            ax.set_title(f"{mode} mode: {label}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.set_xlim(0, steps)
            if row == 1:
                ax.set_xlabel("training step (the service applies one update per step, all ranks)")
    handles = [Line2D([], [], color=c, lw=2, label=f"channel {i}") for i, c in enumerate(colors)]
    handles += [Line2D([], [], color="gray", lw=2, label="shared through normsvc (WatchLayer)"),
                Line2D([], [], color="gray", lw=1, ls="--", label="true population"),
                Line2D([], [], color="gray", lw=1, ls=":", label="plain BatchNorm, rank 0 alone")]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle(f"The first BatchNorm's running statistics: {world} ranks, each with its own data distribution",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="training steps per mode")
    p.add_argument("--world", type=int, default=4, help="trainer processes")
    p.add_argument("--batch", type=int, default=32, help="images per rank and step")
    p.add_argument("--png", type=Path, default=DEFAULT_PNG, help="where to write the plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, tests)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.world < 2 or args.batch < 2:
        p.error("expected --steps >= 1, --world >= 2 and --batch >= 2")

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 110))  # a table never wraps in a log
    torch.set_num_threads(1)
    started = time.perf_counter()
    failures = []
    with tempfile.TemporaryDirectory(prefix="normsvc-demo-") as tmp, serve(tmp, console.print) as address, \
            normsvc.Client(address) as client:
        watched = {mode: f"{PREFIX}{mode}/inp" for mode in MODES}
        for name in watched.values():  # the config convert() gives the layer, so it is reused
            client.create_layer(name, kind="batch", axis=1, convention="torch", momentum=MOMENTUM, epsilon=1e-5,
                                num_features=CHANNELS)
        history = History(client, list(watched.values()))
        history.start()
        runs = {mode: f"demo-{mode}-{uuid.uuid4().hex[:8]}" for mode in MODES}
        events = mp.get_context("spawn").Queue()
        console.print(f"{args.world} trainers (torch.multiprocessing spawn, gloo, DDP), {args.steps} steps per mode, "
                      f"{args.batch} images per rank and step; rank r's camera: offset and gain of its own")
        losses, alone = {m: [] for m in MODES}, {m: [] for m in MODES}
        columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[note]}"), TimeElapsedColumn())
        with Progress(*columns, console=console, disable=args.no_progress) as progress:
            steps_task, service_task = {}, {}
            for m in MODES:
                steps_task[m] = progress.add_task(f"{m} mode: trainer steps, all ranks", total=args.steps * args.world,
                                                  note="")
                service_task[m] = progress.add_task(f"{m} mode: updates the service applied", total=args.steps,
                                                    note="")
            procs = mp.spawn(trainer, args=(args.world, address, tmp, runs, args.steps, args.batch, events),
                             nprocs=args.world, join=False)

            def drain():
                while True:
                    try:
                        event = events.get_nowait()
                    except queue.Empty:
                        break
                    if event[0] == "step":
                        _, mode, rank, step, loss, mean, var = event
                        losses[mode].append(loss)
                        if rank == 0:
                            alone[mode].append((mean, var))
                        progress.update(steps_task[mode], advance=1, note=f"loss {np.mean(losses[mode][-8:]):.3f}")
                for mode in MODES:
                    progress.update(service_task[mode], completed=history.applied(watched[mode]))

            try:
                while not procs.join(timeout=0.1):  # raises what a trainer raised
                    drain()
            except BaseException:
                for proc in procs.processes:
                    if proc.is_alive():
                        proc.terminate()
                raise
            deadline = time.monotonic() + 10  # the last versions' notifications
            while min(history.applied(n) for n in watched.values()) < args.steps and time.monotonic() < deadline:
                time.sleep(0.05)
            drain()
        history.stop()
        if history.error is not None:
            raise history.error

        # --- the statistics ---------------------------------------------------------
        pop = population(args.world)
        exact = replay(args.world, args.steps, args.batch)
        infos = {info.name: info for info in client.describe(prefix=PREFIX)}
        final = {m: (infos[watched[m]].stats.mean, infos[watched[m]].stats.variance) for m in MODES}
        rank0 = tuple(np.array(v) for v in alone["shared"][-1])
        _stats_table(console, f"First BatchNorm (the raw images): running statistics after {args.steps} steps of "
                     f"{args.world} ranks", args.world, args.steps, pop, exact, final["shared"], final["sync"], rank0)
        for mode in MODES:
            if not (_close(final[mode][0], exact[0]) and _close(final[mode][1], exact[1])):
                failures.append(f"{mode} mode: the service's statistics differ from numpy's replay")
        updates = sorted({info.stats.num_batches for info in infos.values()})
        console.print(f"every layer ({len(infos)}): num_batches_tracked = {updates} (one update per step, not per "
                      f"rank and step); the service agrees with numpy to {RTOL:g} (relative) + {ATOL:g}: "
                      f"{'yes' if not failures else 'NO'}")
        if updates != [args.steps]:
            failures.append(f"expected {args.steps} updates per layer, got {updates}")
        gap = max(np.max(np.abs(final[m][k] - pop[k]) / pop[1] ** (0.5 if k == 0 else 1.0)) for m in MODES
                  for k in (0, 1))
        console.print(f"distance to the population: at most {gap:.3f} (mean: in standard deviations; variance: "
                      "relative); rank 0 alone tracks its own camera instead")

        # --- frozen statistics, inference --------------------------------------------------
        for name in infos:
            client.layer(name).freeze()
        x0, _ = batch(0, 0, 4)
        try:
            client.layer(watched["shared"]).update(normsvc.moments(x0, axes=[0, 2, 3]))
            failures.append("a frozen layer took an update")
        except normsvc.FrozenLayer as exc:
            console.print(f"frozen {len(infos)} layers; an update is refused: {type(exc).__name__}: "
                          f"{str(exc)[:90]}")
        from rich.table import Table

        table = Table(title="Inference with the frozen statistics: a plain torch Net", title_justify="left")
        table.add_column("held-out data of")
        for mode in MODES:
            table.add_column(f"accuracy, {mode}-mode model", justify="right")
        models = {}
        for mode in MODES:
            plain = Net()
            plain.load_state_dict(torch.load(os.path.join(tmp, f"{mode}.pt")), strict=True)
            loaded = normsvc.torch.load_running_stats(plain, client, prefix=f"{PREFIX}{mode}/")
            models[mode] = plain.eval()
            assert sorted(loaded) == ["bn1", "bn2", "inp"], loaded
        for rank in range(args.world):
            table.add_row(f"rank {rank}'s camera", *(f"{_accuracy(models[m], rank):.3f}" for m in MODES))
        console.print(table)
        console.print("(each model: rank 0's weights loaded strictly, the frozen statistics from the service with "
                      "normsvc.torch.load_running_stats; shared mode trained every rank with its own batch's "
                      "statistics and infers with the shared ones, so a camera far from the mix can lose accuracy; "
                      "sync mode trained with the statistics of all ranks, as it infers)")
        plot(args.png, history, pop, alone, args.steps, args.world)
        console.print(f"wrote {args.png}")
    for failure in failures:
        console.print(f"FAILED: {failure}")
    console.print(f"done in {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
