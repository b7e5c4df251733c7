"""`make demo` (examples/torch_demo.py) in a fast mode: 4 steps per mode, 4 real trainer processes.

The demo's table is checked against numpy computed here, not against the
demo's own numpy column: the service's running statistics (shared and sync
mode) and rank 0's plain BatchNorm against torch's update rule replayed in
float64 over the same batches (to 1e-5 relative + 1e-6 absolute: the
trainers compute batch statistics in float32, the table prints 7 digits),
and the population column against the law of total variance over every
(rank, class, pixel) component of the data (to 1e-6).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib", reason="the demo extra: pip install -e '.[demo]' (make demo installs it)")
pytest.importorskip("rich", reason="the demo extra: pip install -e '.[demo]' (make demo installs it)")

DEMO = Path(__file__).resolve().parents[1] / "examples" / "torch_demo.py"
STEPS, WORLD, BATCH = 4, 4, 16
RTOL, ATOL = 1e-5, 1e-6


def _demo_module():
    """The demo's data (``batch``, ``camera``, the class patterns), imported without running it."""
    spec = importlib.util.spec_from_file_location("torch_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_rule(batches) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm2d's running statistics (momentum 0.1, unbiased variance) after ``batches``, float64."""
    mean, var = np.zeros(3), np.ones(3)
    for x in batches:
        x = x.astype(np.float64)
        mean = 0.9 * mean + 0.1 * x.mean(axis=(0, 2, 3))
        var = 0.9 * var + 0.1 * x.var(axis=(0, 2, 3), ddof=1)
    return mean, var


def _population(demo) -> tuple[np.ndarray, np.ndarray]:
    """Every (rank, class, pixel) is a normal component of equal weight: total mean and variance."""
    cams = [demo.camera(r) for r in range(WORLD)]
    t = demo.TEMPLATES.transpose(1, 0, 2, 3).reshape(3, -1)  # channel x (class, pixel)
    means = np.concatenate([o[:, None] + g[:, None] * t for o, g in cams], axis=1)
    within = np.stack([g**2 * demo.NOISE**2 for _, g in cams]).mean(axis=0)
    return means.mean(axis=1), within + means.var(axis=1)


def _table(stdout: str) -> dict:
    """{("mean" | "var", channel): [population, numpy, shared, sync, rank 0 alone]} from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
        if cells and re.fullmatch(r"(mean|var)\[\d\]", cells[0]):
            kind, channel = cells[0][:-3], int(cells[0][-2])
            rows[(kind, channel)] = [float(c) for c in cells[1:]]
    return rows


@pytest.mark.timeout(240)
def test_demo_runs_and_its_table_matches_numpy(tmp_path):
    png = tmp_path / "out" / "demo.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NORMSVC_", "TORCHELASTIC_", "SLURM_"))}
    done = subprocess.run([sys.executable, str(DEMO), "--steps", str(STEPS), "--world", str(WORLD), "--batch",
                           str(BATCH), "--png", str(png), "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout

    demo = _demo_module()
    batches = [[demo.batch(r, s, BATCH)[0] for r in range(WORLD)] for s in range(STEPS)]
    shared = _torch_rule(np.concatenate(step) for step in batches)  # one process, the concatenated batch
    alone = _torch_rule(step[0] for step in batches)
    pop = _population(demo)
    rows = _table(out)
    assert len(rows) == 6, out
    for (kind, c), (population, numpy_col, shared_col, sync_col, alone_col) in rows.items():
        k = 0 if kind == "mean" else 1
        np.testing.assert_allclose(population, pop[k][c], rtol=1e-6)
        for got in (numpy_col, shared_col, sync_col):
            np.testing.assert_allclose(got, shared[k][c], rtol=RTOL, atol=ATOL, err_msg=f"{kind}[{c}]")
        np.testing.assert_allclose(alone_col, alone[k][c], rtol=RTOL, atol=ATOL, err_msg=f"{kind}[{c}] alone")

    assert f"num_batches_tracked = [{STEPS}]" in out  # every layer of both modes: one update per step
    assert "an update is refused: FrozenLayer" in out
    accuracies = re.findall(r"rank (\d)'s camera\s*│\s*([\d.]+)\s*│\s*([\d.]+)", out)
    assert [int(r) for r, *_ in accuracies] == list(range(WORLD)), out
    assert all(0.0 <= float(a) <= 1.0 for _, *pair in accuracies for a in pair)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "server stopped (exit code 0)" in out
