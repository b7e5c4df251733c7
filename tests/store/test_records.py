"""Records and their versioned codec: exact round trips, older formats upgraded, newer ones refused."""

import json

import numpy as np
import pytest

from normsvc import RunningStats
from normsvc.store import FailedPrecondition
from normsvc.config import make_config
from normsvc.store.records import (
    FORMAT,
    UPGRADES,
    Record,
    decode_config,
    decode_record,
    encode_config,
    encode_record,
    known_shape,
    new_record,
)

CONFIGS = [
    make_config(),
    make_config(kind="group", groups=4, axis=1, convention="torch", momentum=None),
    make_config(axis=[1, 3], num_features=(2, 3), convention="cumulative", center=False),
    make_config(kind="rms", axis=[-2, -1], epsilon=1e-6),
    make_config(renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 5.0}, renorm_momentum=0.9, virtual_batch_size=4),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_records_round_trip_exactly(config):
    shape = config.declared_shape or (5,)
    mean = np.linspace(-1, 1, int(np.prod(shape))).reshape(shape) / 3
    renorm = {}
    if config.renorm:  # three more arrays, each its own values
        renorm = dict(moving_stddev=np.full(shape, 1.5), renorm_mean=-mean, renorm_stddev=np.full(shape, 0.25))
    stats = RunningStats(mean, np.full(shape, np.pi), 96.0, 3, 7, True, 1700000000.25, **renorm)
    record = Record("enc/bn1", config, stats)
    fields = encode_record(record)
    assert isinstance(fields["mean"], bytes) and isinstance(fields["config"], str)
    back = decode_record("enc/bn1", fields)
    assert back == record and back.stats.mean.dtype == np.float64
    assert (back.stats.renorm is None) == (fields["renorm"] == b"") == (not config.renorm)


def test_the_current_format_is_written():
    data = json.loads(encode_config(CONFIGS[1]))
    assert data["format"] == FORMAT == 4
    assert data["config"] == CONFIGS[1].to_dict()


@pytest.mark.parametrize("config", CONFIGS)
def test_format_1_configs_are_upgraded(config):
    """Format 1 stored the bare config dict; every step up to FORMAT has an upgrade."""
    assert sorted(UPGRADES) == list(range(1, FORMAT))
    assert decode_config(json.dumps(config.to_dict(), sort_keys=True)) == config


@pytest.mark.parametrize("found, message", [(FORMAT + 1, "newer than this normsvc reads"), (0, "expected an integer"),
                                            ("2", "expected an integer")])
def test_other_formats_are_refused(found, message):
    text = json.dumps({"format": found, "config": CONFIGS[0].to_dict()})
    with pytest.raises(FailedPrecondition, match=message):
        decode_config(text)


def test_new_records_start_at_version_0():
    lazy = new_record("bn", make_config())
    assert lazy.stats.version == 0 and lazy.stats.mean.shape == () and known_shape(lazy) is None
    group = new_record("gn", make_config(kind="group", groups=4))
    assert known_shape(group) == (4,)


@pytest.mark.parametrize("change", [{"kind": "bogus"}, {"convention": "bogus"}, {"momentum": 7.0},
                                    {"epsilon": -5.0}, {"axis": "abc"}, {"groups": 4}, {"shape": 1}])
def test_a_stored_config_is_checked_when_read(change, tmp_path):
    # state written otherwise (an older normsvc, a hand-edited file) is refused with a clear error,
    # never served as an internal error
    import sqlite3

    from normsvc import Store
    from normsvc.errors import FailedPrecondition

    url = f"sqlite:///{tmp_path / 'stats.db'}"
    with Store.open(url) as store:
        store.create_layer("good")
        store.create_layer("bad")
    with sqlite3.connect(tmp_path / "stats.db") as conn:
        text = conn.execute("SELECT config FROM layers WHERE name = 'bad'").fetchone()[0]
        data = json.loads(text)
        data["config"].update(change)
        conn.execute("UPDATE layers SET config = ? WHERE name = 'bad'", (json.dumps(data),))
    with Store.open(url) as store:
        assert store.layer("good").stats().version == 0
        with pytest.raises(FailedPrecondition, match="layer 'bad': the stored config is invalid") as info:
            store.layer("bad").stats()
        assert info.value.layer == "bad" and "create it again" in str(info.value)
        store.delete_layer("bad")  # and the way out works
        assert store.list_layers() == ["good"]
