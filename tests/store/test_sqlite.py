"""The sqlite backend: reopening, options, exact values, and the versioned file format with its migration."""

import contextlib
import json
import math
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from normsvc import Store
from normsvc.store import FailedPrecondition, InvalidArgument, LayerConfig, StoreUnavailable
from normsvc.store.records import FORMAT
from store_testing import batch_moments, np_moments


def test_sqlite_reopen_keeps_layers(sqlite_url):
    with Store.open(sqlite_url) as s:
        s.create_layer("bn2", axis=[1, 3], num_features=(2, 3), convention="torch", momentum=None)
        s.create_layer("gn", kind="group", groups=2, axis=1)
    with Store.open(sqlite_url) as s:
        assert s.list_layers() == ["bn2", "gn"]
        assert s.layer("bn2").config() == LayerConfig("batch", (1, 3), None, 1e-5, None, "torch", True, True, (2, 3))
        assert s.layer("gn").stats().mean.shape == (2,)


def test_sqlite_options(tmp_path):
    with pytest.raises(InvalidArgument, match="unknown sqlite options"):
        Store.open(f"sqlite:///{tmp_path}/a.db?sync=full")
    with pytest.raises(InvalidArgument, match="synchronous"):
        Store.open(f"sqlite:///{tmp_path}/a.db", synchronous="off")
    with pytest.raises(StoreUnavailable):
        Store.open(f"sqlite:///{tmp_path}/missing/dir/a.db")


def test_closed_sqlite_store(sqlite_url):
    s = Store.open(sqlite_url)
    s.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        s.list_layers()


def test_sqlite_persists_exact_values(sqlite_url, rng):
    with Store.open(sqlite_url) as a:
        layer = a.create_layer("bn", convention="cumulative")
        for _ in range(5):
            layer.update(batch_moments(rng, c=6, loc=math.pi, scale=1e-3))
        want = layer.stats()
    with Store.open(sqlite_url) as b:
        assert b.layer("bn").stats() == want
        assert b.layer("bn").stats().mean.dtype == np.float64


# --- the versioned file format -------------------------------------------------------
# tests/store/fixtures/store_v1.db was written by normsvc before the format had a version
# (see make_store_v1.py there); store_v1.json holds what every layer read back then.

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _old_file(tmp_path) -> Path:
    path = tmp_path / "old.db"
    shutil.copyfile(FIXTURES / "store_v1.db", path)  # opening migrates: never the committed file
    return path


def _user_version(path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def _config_json(path, name) -> dict:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return json.loads(conn.execute("SELECT config FROM layers WHERE name = ?", (name,)).fetchone()[0])


def test_a_format_1_file_is_migrated_on_open_and_reads_identically(tmp_path):
    path = _old_file(tmp_path)
    expected = json.loads((FIXTURES / "store_v1.json").read_text())["layers"]
    assert _user_version(path) == 0 and "format" not in _config_json(path, "gn")
    with Store.open(f"sqlite:///{path}") as store:
        assert store.list_layers() == sorted(expected)
        for name, want in expected.items():
            layer = store.layer(name)
            s = layer.stats()
            assert layer.config() == LayerConfig.from_dict(want["config"]), name
            assert list(s.mean.shape) == want["shape"], name
            assert (np.ravel(s.mean).tolist(), np.ravel(s.variance).tolist()) == (want["mean"], want["variance"])
            assert (s.count, s.num_batches, s.version, s.frozen, s.updated_at) == (
                want["count"], want["num_batches"], want["version"], want["frozen"], want["updated_at"]), name
    assert _user_version(path) == FORMAT
    assert _config_json(path, "gn")["format"] == FORMAT


def test_a_migrated_file_keeps_its_request_ids_and_takes_updates(tmp_path, rng):
    path = _old_file(tmp_path)
    expected = json.loads((FIXTURES / "store_v1.json").read_text())["layers"]
    with Store.open(f"sqlite:///{path}") as store:
        for name, want in expected.items():
            for request_id in want["request_ids"]:  # retries of what the old file applied: no-ops
                assert store.layer(name).reset(request_id=request_id).version == want["version"]
        s = store.layer("torch/bn").update(np_moments(rng.normal(size=(4, 3, 2)), [0, 2]), request_id="new")
        assert s.version == expected["torch/bn"]["version"] + 1
    with Store.open(f"sqlite:///{path}") as store:  # opening a current file changes nothing
        assert store.layer("torch/bn").stats() == s


def test_a_newer_file_is_refused(tmp_path):
    path = tmp_path / "newer.db"
    with Store.open(f"sqlite:///{path}") as store:
        store.create_layer("bn")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {FORMAT + 1}")
    with pytest.raises(FailedPrecondition, match=f"format {FORMAT + 1}, newer than this normsvc reads") as info:
        Store.open(f"sqlite:///{path}")
    assert "newer.db" in str(info.value) and info.value.field == "url"
    assert _user_version(path) == FORMAT + 1  # left as it was


def test_a_new_file_starts_at_the_current_format(tmp_path):
    path = tmp_path / "new.db"
    Store.open(f"sqlite:///{path}").close()
    assert _user_version(path) == FORMAT
