"""The client subcommands of ``normsvc`` against real servers: tables, actions, one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from normsvc import Moments
from normsvc.cli import main
from normsvc.client import Client

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def populated(start_server):
    """An in-process server (memory store) with three layers, one of them updated and frozen."""
    server = start_server()
    with Client(server.address) as client:
        bn = client.create_layer("net/bn1", convention="torch")
        bn.update(Moments.from_samples(np.arange(12.0).reshape(4, 3)))
        bn.freeze()
        client.create_layer("net/ln", kind="layer", axis=[1, 2])
        client.create_layer("other/gn", kind="group", groups=4, convention="cumulative")
    return server.address


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_layers_list_is_an_aligned_table(populated, capsys):
    code, out, err = cli(capsys, "layers", "list", "--target", populated)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "CONVENTION", "EPSILON", "SHAPE", "COUNT", "BATCHES", "VERSION",
                                "FROZEN", "UPDATED"]
    assert [line.split()[0] for line in lines[1:]] == ["net/bn1", "net/ln", "other/gn"]
    assert lines[1].split()[:9] == ["net/bn1", "batch", "torch", "1e-05", "3", "4", "1", "2", "yes"]
    assert lines[3].split()[:9] == ["other/gn", "group", "cumulative", "0.001", "4", "0", "0", "0", "no"]
    # every column starts at the same offset on every line
    for header in ("KIND", "CONVENTION", "SHAPE", "FROZEN", "UPDATED"):
        start = lines[0].index(header)
        assert all(line[start - 2:start] == "  " and line[start] != " " for line in lines[1:])
    # numbers are right-aligned under their header
    end = lines[0].index("VERSION") + len("VERSION")
    assert all(line[end - 1].isdigit() for line in lines[1:])


def test_layers_list_prefix_and_empty(populated, capsys):
    code, out, _ = cli(capsys, "layers", "list", "--target", populated, "--prefix", "net/")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["net/bn1", "net/ln"]
    code, out, _ = cli(capsys, "layers", "list", "--target", populated, "--prefix", "nothing/")
    assert code == 0 and out.strip() == "no layers under prefix 'nothing/'"


def test_layers_show(populated, capsys):
    code, out, _ = cli(capsys, "layers", "show", "--target", populated, "net/bn1", "other/gn")
    assert code == 0
    first, second = out.split("\n\n")
    fields = dict(line.split(None, 1) for line in first.splitlines())
    assert fields["name"] == "net/bn1" and fields["convention"] == "torch" and fields["momentum"] == "0.1"
    assert fields["frozen"] == "yes" and fields["version"] == "2" and fields["shape"] == "3"
    assert fields["mean"] == "[0.45 0.55 0.65]"
    values = [line.split(None, 1)[1] for line in first.splitlines()]
    assert len({line.index(v) for line, v in zip(first.splitlines(), values)}) == 1  # one value column
    assert "groups      4" in second and "mean        [0. 0. 0. 0.]" in second
    # the resolved epsilon, and whether it is the convention's default (cumulative takes Keras' 1e-3)
    assert fields["epsilon"] == "1e-05 (the torch convention's default)"
    assert "epsilon     0.001 (the cumulative convention's default)" in second


def test_freeze_unfreeze_reset_delete(populated, capsys):
    target = ["--target", populated]
    assert cli(capsys, "layers", "unfreeze", *target, "net/bn1")[1] == "unfroze net/bn1 (version 3)\n"
    assert cli(capsys, "layers", "freeze", *target, "net/bn1", "net/ln")[1] == \
        "froze net/bn1 (version 4)\nfroze net/ln (version 1)\n"
    assert cli(capsys, "layers", "reset", *target, "net/bn1")[1] == "reset net/bn1 (version 5)\n"
    assert cli(capsys, "layers", "delete", *target, "other/gn")[1] == "deleted other/gn\n"
    with Client(populated) as client:
        assert client.list_layers() == ["net/bn1", "net/ln"]
        stats = client.layer("net/bn1").stats()
    assert stats.frozen and stats.count == 0


def test_export_and_import(populated, capsys, tmp_path):
    path = tmp_path / "stats.safetensors"
    target = ["--target", populated]
    code, out, _ = cli(capsys, "export", str(path), *target, "--naming", "torch", "--layer", "net/bn1")
    assert code == 0 and out == f"exported 1 layer to {path}\n" and path.exists()
    with Client(populated) as client:
        client.layer("net/bn1").reset()
    code, out, _ = cli(capsys, "import", str(path), *target, "--naming", "torch")
    assert code == 0 and out == f"imported 1 layer from {path}: net/bn1\n"
    with Client(populated) as client:
        np.testing.assert_allclose(client.layer("net/bn1").stats().mean, [0.45, 0.55, 0.65])


@pytest.mark.parametrize("naming, leaves", [
    ("keras", ["/moving_mean", "/moving_variance"]),
    ("torch", [".running_mean", ".running_var", ".num_batches_tracked"]),
])
def test_export_a_prefix_in_float32_and_import_it_under_another(populated, capsys, tmp_path, naming, leaves):
    from safetensors.numpy import load_file

    path, target = tmp_path / "net.safetensors", ["--target", populated]
    code, out, err = cli(capsys, "export", str(path), *target, "--prefix", "net/", "--strip-prefix",
                         "--dtype", "float32", "--naming", naming)
    assert code == 0 and err == "" and out == f"exported 2 layers to {path}\n"
    tensors = load_file(path)
    assert set(tensors) == {name + leaf for name in ("bn1", "ln") for leaf in leaves}
    with Client(populated) as client:
        for name in ("bn1", "ln"):
            stats = client.layer(f"net/{name}").stats()
            for leaf, want in zip(leaves, (stats.mean, stats.variance)):
                assert tensors[name + leaf].dtype == np.float32
                np.testing.assert_array_equal(tensors[name + leaf], want.astype(np.float32))
    code, out, err = cli(capsys, "import", str(path), *target, "--naming", naming, "--add-prefix", "copy/")
    assert code == 0 and err == "" and out == f"imported 2 layers from {path}: copy/bn1, copy/ln\n"
    with Client(populated) as client:
        original, copy = client.layer("net/bn1").stats(), client.layer("copy/bn1").stats()
        np.testing.assert_allclose(copy.mean, original.mean, rtol=2 ** -24)  # one float32 rounding
        assert (copy.count, copy.num_batches) == (original.count, original.num_batches)
    # --strip-prefix with a value, for named layers
    code, out, _ = cli(capsys, "export", str(path), *target, "--layer", "other/gn", "--strip-prefix", "other/")
    assert code == 0 and out == f"exported 1 layer to {path}\n"
    assert set(load_file(path)) == {"gn/moving_mean", "gn/moving_variance"}


@pytest.mark.parametrize("argv, message", [
    (["layers", "show", "missing"], "normsvc layers show: no layer named 'missing'"),
    (["export", "x.safetensors", "--strip-prefix"], "normsvc export: strip_prefix=True removes the prefix given"),
    (["export", "x.safetensors", "--layer", "net/bn1", "--prefix", "net/"],
     "normsvc export: layers=['net/bn1'] and prefix='net/' both select layers"),
    (["export", "x.safetensors", "--prefix", "nothing/"], "normsvc export: no layer starts with prefix 'nothing/'"),
    (["export", "x.safetensors", "--prefix", "net/", "--strip-prefix", "other/"],
     "normsvc export: layer 'net/bn1' does not start with strip_prefix 'other/'"),
    (["layers", "freeze", "missing"], "normsvc layers freeze: no layer named 'missing'"),
    (["layers", "delete", "bad//name"], "normsvc layers delete: layer name 'bad//name' is not valid"),
    (["import", "no-such-file.safetensors"], "normsvc import: no file 'no-such-file.safetensors' to import"),
    (["export", "no-such-dir/stats.safetensors"], "normsvc export: "),
])
def test_errors_are_one_line_and_non_zero(populated, capsys, argv, message):
    code, out, err = cli(capsys, *argv, "--target", populated)
    assert code == 1 and out == ""
    assert err.startswith(message) and err.endswith("\n") and err.count("\n") == 1


def test_unreachable_server(capsys):
    code, out, err = cli(capsys, "layers", "list", "--target", "127.0.0.1:1", "--timeout", "1")
    assert code == 1 and out == ""
    assert err.startswith("normsvc layers list: ListLayers on 127.0.0.1:1") and err.count("\n") == 1


def test_target_and_token_from_the_environment(start_server, tmp_path, capsys, monkeypatch):
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"tokens": [{"token": "admin-token", "role": "admin"}]}')
    server = start_server(tokens=str(tokens))
    monkeypatch.setenv("NORMSVC_TARGET", server.address)
    code, _, err = cli(capsys, "layers", "list")
    assert code == 1 and "UNAUTHENTICATED" not in err and "no credentials" in err
    monkeypatch.setenv("NORMSVC_TOKEN", "admin-token")
    code, out, _ = cli(capsys, "layers", "list")
    assert code == 0 and out == "no layers\n"


def test_the_installed_command_against_a_subprocess_server(process_address):
    exe = shutil.which("normsvc", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "normsvc.cli"]
    env = {**os.environ, "NORMSVC_TARGET": process_address}
    with Client(process_address) as client:
        client.create_layer("cli/bn", num_features=2)
    done = subprocess.run([*cmd, "layers", "list", "--prefix", "cli/"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[:3] == ["cli/bn", "batch", "keras"]
    done = subprocess.run([*cmd, "layers", "show", "cli/missing"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == "normsvc layers show: no layer named 'cli/missing': expected an existing layer (create it first)"


def test_layers_create_with_renorm_and_virtual_batches(start_server, capsys):
    address = start_server().address
    code, out, err = cli(capsys, "layers", "create", "--target", address, "keras/bn", "--renorm",
                         "--renorm-clipping", "rmax=3,rmin=0.25,dmax=5", "--renorm-momentum", "0.9",
                         "--virtual-batch-size", "4", "--momentum", "0.95", "--num-features", "3")
    assert (code, err) == (0, "") and out.strip() == "created keras/bn (or it existed with this config)"
    with Client(address) as client:
        config = client.layer("keras/bn").config()
    assert (config.renorm, config.renorm_clipping, config.renorm_momentum) == (
        True, {"rmin": 0.25, "rmax": 3.0, "dmax": 5.0}, 0.9)
    assert (config.virtual_batch_size, config.momentum, config.num_features) == (4, 0.95, (3,))
    code, out, _ = cli(capsys, "layers", "show", "--target", address, "keras/bn")
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["renorm"] == "yes (momentum 0.9, clipping rmin=0.25, rmax=3, dmax=5)"
    assert fields["virtual_batch_size"] == "4"
    assert fields["moving_stddev"] == "[1. 1. 1.]" and fields["renorm_mean"] == "[0. 0. 0.]"
    # a torch-convention torch layer has no renorm: the store's error, in one line
    code, _, err = cli(capsys, "layers", "create", "--target", address, "t/bn", "--convention", "torch", "--renorm")
    assert code == 1 and "renorm is tf.keras' BatchNormalization option" in err
    with pytest.raises(SystemExit):
        main(["layers", "create", "--target", address, "x", "--renorm", "--renorm-clipping", "rmax"])
    assert "expected KEY=NUMBER" in capsys.readouterr().err
