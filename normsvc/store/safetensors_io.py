"""Export and import running statistics as safetensors files (never pickle).

Tensor names follow the framework a file is meant for:

=========  ==========================================================
naming     tensors per layer
=========  ==========================================================
keras      ``{layer}/moving_mean``, ``{layer}/moving_variance``
torch      ``{layer}.running_mean``, ``{layer}.running_var``,
           ``{layer}.num_batches_tracked`` (int64 scalar)
=========  ==========================================================

A layer with batch renormalization also has ``{layer}/moving_stddev``,
``{layer}/renorm_mean`` and ``{layer}/renorm_stddev`` (tf.keras' variable
names; with the torch naming's ``.``), all three or none.

Values are written as the layer stores them (a torch-convention layer's
variance is its unbiased running variance, a keras one's the biased moving
variance): the naming picks names, it converts nothing.  The file's metadata
(key ``normsvc``, JSON) also carries each layer's config, sample count and
batch count, so exporting and importing with normsvc round-trips exactly::

    {"format": 1, "naming": "torch",
     "layers": {"enc/bn1": {"config": {...}, "count": 96.0, "num_batches": 3}}}

Files without it (e.g. a torch ``state_dict`` saved with safetensors) import
too, with a count of 0 and, for layers that do not exist yet, the naming's
framework defaults (keras: a keras batch layer on axis -1; torch: a torch
batch layer on axis 1).  Tensors other than these names are ignored.

A file may hold one model's statistics under the model's own names:
``export(path, prefix="resnet50/", strip_prefix=True)`` writes the layers
whose names start with ``resnet50/`` without it (``bn1/moving_mean``; the
metadata too), and ``import_(path, add_prefix="resnet50/")`` loads them back
under it (or under another model's prefix).  Both return the names as the
store has them.

Import is all or nothing: the layers it creates and the statistics it writes
go to the store in one transaction (:meth:`Store.put_stats`: version +1 for
each layer with tensors; the frozen flag and an existing layer's config
stay).  Everything in the file is checked first, configs with the same
checks as ``create_layer``; a file that fails any check changes nothing.
Statistics are written as float64 unless ``dtype="float32"``.

This module uses only the public methods of the store it is given.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping

import numpy as np

from .. import prefixes
from ..running import RunningStats
from . import validation
from ..errors import InvalidArgument, ResourceExhausted, StoreUnavailable
from .records import Record, known_shape

__all__ = ["NAMINGS", "FILE_FORMAT", "export_stats", "import_stats"]

NAMINGS = {
    "keras": {"sep": "/", "mean": "moving_mean", "variance": "moving_variance", "num_batches": None},
    "torch": {"sep": ".", "mean": "running_mean", "variance": "running_var", "num_batches": "num_batches_tracked"},
}
#: Version of the metadata layout above (not of the store's own records).
FILE_FORMAT = 1
_METADATA_KEY = "normsvc"
_ENTRY_KEYS = ("config", "count", "num_batches")
#: Batch renormalization's statistics: the same leaf names in both namings.
_RENORM = ("moving_stddev", "renorm_mean", "renorm_stddev")


def _naming(naming) -> dict:
    if naming not in NAMINGS:
        raise InvalidArgument(f"naming={naming!r}: expected 'keras' or 'torch'", field="naming")
    return NAMINGS[naming]


def _layer_names(store, layers) -> list[str]:
    if layers is None:
        return store.list_layers()
    if isinstance(layers, str):
        layers = [layers]
    return [validation.validate_name(n) for n in layers]


def _renamed(name: str, *, strip: str = "", add: str = "") -> str:
    """``name`` without ``strip`` (which it must start with) and with ``add`` before it, checked.

    The InvalidArgument names the layer and the argument (``strip_prefix`` or
    ``add_prefix``) at fault.
    """
    if not (strip or add):
        return name
    field = "strip_prefix" if strip else "add_prefix"
    if not name.startswith(strip):
        raise InvalidArgument(f"layer {name!r} does not start with strip_prefix {strip!r}: expected every "
                              "exported layer to start with it", layer=name, field=field)
    new = add + name[len(strip):]
    try:
        return validation.validate_name(new)
    except InvalidArgument as exc:
        change = f"without {field} {strip!r}" if strip else f"with {field} {add!r}"
        raise InvalidArgument(f"layer {name!r} {change} would be {new!r}: {exc.message}", layer=name,
                              field=field) from None


# --- export ---------------------------------------------------------------------


def export_stats(store, path, *, layers=None, naming: str = "keras", prefix=None, strip_prefix=None,
                 dtype: str = "float64") -> list[str]:
    """Write the statistics of ``layers``, or of the layers under ``prefix`` (default: all), to ``path``.

    Returns the names of the layers written, as the store has them; the file
    names them without ``strip_prefix`` (True: the ``prefix``).  Layers whose
    statistics shape is still unknown are written to the metadata only.  The
    file is replaced atomically; nothing is written when an argument is bad.
    """
    spec = _naming(naming)
    if dtype not in ("float64", "float32"):
        raise InvalidArgument(f"dtype={dtype!r}: expected 'float64' or 'float32'", field="dtype")
    prefix, strip = prefixes.export_prefixes(layers, prefix, strip_prefix)
    names = _layer_names(store, layers) if layers is not None else store.list_layers(prefix)
    if prefix and not names:
        raise InvalidArgument(f"no layer starts with prefix {prefix!r}: expected the prefix of existing layers",
                              field="prefix")
    exported = {name: _renamed(name, strip=strip) for name in names}
    tensors, meta = {}, {}
    for name in names:
        layer = store.layer(name)
        record = Record(name, layer.config(), layer.stats())
        s = record.stats
        meta[exported[name]] = {"config": record.config.to_dict(), "count": s.count, "num_batches": s.num_batches}
        if known_shape(record) is None:
            continue
        key = exported[name] + spec["sep"]
        tensors[key + spec["mean"]] = np.asarray(s.mean, dtype=dtype, order="C")
        tensors[key + spec["variance"]] = np.asarray(s.variance, dtype=dtype, order="C")
        if spec["num_batches"]:
            tensors[key + spec["num_batches"]] = np.array(s.num_batches, dtype=np.int64)
        for leaf, array in zip(_RENORM, s.renorm or ()):
            tensors[key + leaf] = np.asarray(array, dtype=dtype, order="C")
    metadata = {_METADATA_KEY: json.dumps({"format": FILE_FORMAT, "naming": naming, "layers": meta})}
    _save_atomically(tensors, metadata, os.fspath(path))
    return names


def _save_atomically(tensors: dict, metadata: dict, path: str) -> None:
    from safetensors.numpy import save_file

    fd, tmp = tempfile.mkstemp(prefix=".normsvc-export-", suffix=".safetensors",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreUnavailable(f"cannot write {os.path.basename(path)!r}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- import ---------------------------------------------------------------------


def import_stats(store, path, *, naming: str = "keras", layers=None, add_prefix=None,
                 max_layers: int | None = None) -> list[str]:
    """Load statistics from ``path`` (a file, or the file's bytes) into the store, all or nothing;
    returns the layer names imported.

    ``layers`` are names as the file has them; each goes into the layer
    ``add_prefix + name``, and the names returned are those.  Raises
    InvalidArgument (nothing changed) when the file is not safetensors, its
    metadata is malformed, or any layer's config or statistics fail the
    store's checks (``field="path"``), or a name is no valid layer name with
    ``add_prefix`` (``field="add_prefix"``); ResourceExhausted when the store
    would then hold more than ``max_layers`` layers.
    """
    spec = _naming(naming)
    add = prefixes.text(add_prefix, "add_prefix")
    wanted = None if layers is None else set(_layer_names(store, layers))
    if isinstance(path, (bytes, bytearray, memoryview)):
        where, (tensors, metadata) = "the file", _read_bytes(bytes(path))
    else:
        path = os.fspath(path)
        where, (tensors, metadata) = repr(path), _read(path)
    try:
        info = _layers_metadata(metadata)
        found = _group(tensors, spec)
        for name in info:
            found.setdefault(name, {})
        if wanted is not None:
            missing = wanted - set(found)
            if missing:
                raise InvalidArgument(f"{sorted(missing)} not in the file", field="layers")
            found = {k: v for k, v in found.items() if k in wanted}
        stats, configs = {}, {}
        for name, parts in sorted(found.items()):
            target = _renamed(name, add=add)
            configs[target], stats[target] = _entry(name, parts, info.get(name, {}), naming)
        _check_room(store, configs, max_layers)
        store.put_stats({k: v for k, v in stats.items() if v is not None}, create=configs)
    except InvalidArgument as exc:
        field = exc.field if exc.field in ("layers", "add_prefix") else "path"
        raise InvalidArgument(f"{where}: {exc.message}", layer=exc.layer, field=field) from None
    return sorted(configs)


def _check_room(store, names, max_layers: int | None) -> None:
    if max_layers is None:
        return
    held = set(store.list_layers())
    new = len(set(names) - held)
    if new and len(held) + new > max_layers:
        raise ResourceExhausted(
            f"the import would create {new} layers in a store that holds {len(held)}: expected at most "
            f"{max_layers} layers in all (delete layers first, or import fewer)",
            field="safetensors", reason="TOO_MANY_LAYERS",
        )


def _read(path: str) -> tuple[dict, dict]:
    """Tensors and string metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise InvalidArgument(f"no file {path!r} to import", field="path") from None
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise InvalidArgument(f"{path!r} is not a readable safetensors file: {exc}", field="path") from None
    return tensors, metadata


def _read_bytes(data: bytes) -> tuple[dict, dict]:
    """Tensors and string metadata of a safetensors file's bytes (the header is 8 bytes of length, then JSON)."""
    from safetensors.numpy import load

    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > len(data) - 8:
            raise ValueError(f"its header claims {size} bytes of the {max(len(data) - 8, 0)} there are")
        metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
        return load(data), metadata
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise InvalidArgument(f"the file is not readable safetensors: {exc}", field="path") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def _layers_metadata(metadata: dict) -> dict[str, dict]:
    """The ``layers`` of the normsvc metadata, checked for shape and format ({} without metadata)."""
    if _METADATA_KEY not in metadata:
        return {}
    try:
        doc = json.loads(metadata[_METADATA_KEY], parse_constant=_no_constant)
    except ValueError as exc:
        raise InvalidArgument(f"the normsvc metadata is not valid JSON ({exc}): expected a JSON object "
                              "(strict JSON: finite numbers, no NaN or Infinity)") from None
    _expect(doc, dict, "the normsvc metadata", "a JSON object with 'format' and 'layers'")
    _unknown_keys(doc, ("format", "naming", "layers"), "the normsvc metadata")
    found = doc.get("format", FILE_FORMAT)
    if isinstance(found, bool) or not isinstance(found, int) or not 1 <= found <= FILE_FORMAT:
        raise InvalidArgument(f"the normsvc metadata has format {found!r}: this normsvc reads format "
                              f"{FILE_FORMAT} (a newer normsvc wrote it?)")
    layers = doc.get("layers", {})
    _expect(layers, dict, "'layers' in the normsvc metadata", "an object of layer name to entry")
    for name, entry in layers.items():
        what = f"entry {name!r} in the normsvc metadata"
        _expect(entry, dict, what, f"an object with keys among {', '.join(_ENTRY_KEYS)}")
        _unknown_keys(entry, _ENTRY_KEYS, what)
    return layers


def _expect(value, kind: type, what: str, expected: str) -> None:
    if not isinstance(value, kind):
        raise InvalidArgument(f"{what} is {json.dumps(value)[:80]}: expected {expected}")


def _unknown_keys(obj: dict, known: tuple, what: str) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise InvalidArgument(f"{what} has unknown keys {unknown}: expected keys among {', '.join(known)}")


def _group(tensors: dict, spec: dict) -> dict[str, dict]:
    """{layer: {"mean": arr, "variance": arr, "num_batches": arr}} from tensor names."""
    roles = {spec["mean"]: "mean", spec["variance"]: "variance"} | {leaf: leaf for leaf in _RENORM}
    if spec["num_batches"]:
        roles[spec["num_batches"]] = "num_batches"
    out: dict[str, dict] = {}
    for key, value in tensors.items():
        layer, sep, leaf = key.rpartition(spec["sep"])
        if sep and leaf in roles:
            out.setdefault(layer, {})[roles[leaf]] = value
    return out


def _entry(name: str, parts: dict, meta: Mapping, naming: str) -> tuple[Mapping, RunningStats | None]:
    """The config (a dict, checked by the store) and statistics (None: metadata only) of one layer."""
    count = validation.count(meta.get("count", 0.0), name)
    if "num_batches" in parts:
        num_batches = validation.num_batches(_int_scalar(parts["num_batches"], name), name)
    else:
        num_batches = validation.num_batches(meta.get("num_batches", 0), name)
    config = meta.get("config", {"convention": naming, "axis": -1 if naming == "keras" else 1})
    if ("mean" in parts) != ("variance" in parts):
        have, lack = ("mean", "variance") if "mean" in parts else ("variance", "mean")
        raise InvalidArgument(f"layer {name!r} has a {have} tensor but no {lack} tensor in the file", layer=name)
    renorm = {leaf: parts[leaf] for leaf in _RENORM if leaf in parts}
    if renorm and len(renorm) < len(_RENORM):
        missing = [leaf for leaf in _RENORM if leaf not in renorm]
        raise InvalidArgument(f"layer {name!r} has {', '.join(renorm)} but no {', '.join(missing)} tensor in the "
                              "file: expected all three of renorm's statistics, or none", layer=name)
    if "mean" not in parts:
        if renorm:
            raise InvalidArgument(f"layer {name!r} has renorm tensors but no mean and variance in the file",
                                  layer=name)
        return config, None
    return config, RunningStats(parts["mean"], parts["variance"], count, num_batches, **renorm)


def _int_scalar(tensor: np.ndarray, name: str):
    if tensor.dtype.kind not in "iu" or tensor.size != 1:
        raise InvalidArgument(f"num_batches_tracked of layer {name!r} has dtype {tensor.dtype} and shape "
                              f"{tensor.shape}: expected an int64 scalar", layer=name)
    return tensor.reshape(()).item()
