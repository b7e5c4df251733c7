"""Export and import running statistics as safetensors files (never pickle).

Tensor names follow the framework a file is meant for:

=========  ==========================================================
naming     tensors per layer
=========  ==========================================================
keras      ``{layer}/moving_mean``, ``{layer}/moving_variance``
torch      ``{layer}.running_mean``, ``{layer}.running_var``,
           ``{layer}.num_batches_tracked`` (int64 scalar)
=========  ==========================================================

Values are written as the layer stores them (a torch-convention layer's
variance is its unbiased running variance, a keras one's the biased moving
variance): the naming picks names, it converts nothing.  The file's metadata
(key ``normsvc``, JSON) also carries each layer's config, sample count and
batch count, so exporting and importing with normsvc round-trips exactly;
files without it (e.g. a torch ``state_dict`` saved with safetensors) import
too, with a count of 0 and, for layers that do not exist yet, the naming's
framework defaults (keras: a keras batch layer on axis -1; torch: a torch
batch layer on axis 1).  Tensors other than these names are ignored.

Import replaces the statistics of each layer it names in one transaction
(version +1 each), creating missing layers first; it does not change the
frozen flag.  Statistics are written as float64 unless ``dtype="float32"``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace

import numpy as np

from .base import known_shape, new_record
from .config import LayerConfig, make_config, validate_name
from .errors import InvalidArgument, StoreUnavailable

__all__ = ["NAMINGS", "export_stats", "import_stats"]

NAMINGS = {
    "keras": {"sep": "/", "mean": "moving_mean", "variance": "moving_variance", "num_batches": None},
    "torch": {"sep": ".", "mean": "running_mean", "variance": "running_var", "num_batches": "num_batches_tracked"},
}
_METADATA_KEY = "normsvc"
_FORMAT_VERSION = 1


def _naming(naming) -> dict:
    if naming not in NAMINGS:
        raise InvalidArgument(f"naming={naming!r}: expected 'keras' or 'torch'", field="naming")
    return NAMINGS[naming]


def _layer_names(store, layers) -> list[str]:
    if layers is None:
        return store.list_layers()
    if isinstance(layers, str):
        layers = [layers]
    return [validate_name(n) for n in layers]


def export_stats(store, path, *, layers=None, naming: str = "keras", dtype: str = "float64") -> list[str]:
    """Write the statistics of ``layers`` (default: all) to ``path``; returns the layer names written.

    Layers whose statistics shape is still unknown are written to the
    metadata only.  The file is replaced atomically.
    """
    from safetensors.numpy import save_file

    spec = _naming(naming)
    if dtype not in ("float64", "float32"):
        raise InvalidArgument(f"dtype={dtype!r}: expected 'float64' or 'float32'", field="dtype")
    tensors, meta = {}, {}
    names = _layer_names(store, layers)
    for name in names:
        record = store._record(name)
        s = record.stats
        meta[name] = {"config": record.config.to_dict(), "count": s.count, "num_batches": s.num_batches}
        if known_shape(record) is None:
            continue
        sep = spec["sep"]
        tensors[f"{name}{sep}{spec['mean']}"] = np.asarray(s.mean, dtype=dtype, order="C")
        tensors[f"{name}{sep}{spec['variance']}"] = np.asarray(s.variance, dtype=dtype, order="C")
        if spec["num_batches"]:
            tensors[f"{name}{sep}{spec['num_batches']}"] = np.array(s.num_batches, dtype=np.int64)
    metadata = {_METADATA_KEY: json.dumps({"format": _FORMAT_VERSION, "naming": naming, "layers": meta})}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".normsvc-export-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreUnavailable(f"cannot write {os.path.basename(path)!r}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return names


def _read(path):
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise InvalidArgument(f"no file {os.fspath(path)!r} to import", field="path") from None
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise InvalidArgument(f"{os.fspath(path)!r} is not a readable safetensors file: {exc}", field="path") from None
    info = {}
    if _METADATA_KEY in metadata:
        try:
            info = json.loads(metadata[_METADATA_KEY]).get("layers", {})
        except (ValueError, AttributeError):
            raise InvalidArgument(f"{os.fspath(path)!r} has malformed normsvc metadata", field="path") from None
    return tensors, info


def _group(tensors: dict, spec: dict) -> dict[str, dict]:
    """{layer: {"mean": arr, "variance": arr, "num_batches": arr}} from tensor names."""
    roles = {spec["mean"]: "mean", spec["variance"]: "variance"}
    if spec["num_batches"]:
        roles[spec["num_batches"]] = "num_batches"
    out: dict[str, dict] = {}
    for key, value in tensors.items():
        layer, sep, leaf = key.rpartition(spec["sep"])
        if sep and leaf in roles:
            out.setdefault(layer, {})[roles[leaf]] = value
    return out


def import_stats(store, path, *, naming: str = "keras", layers=None) -> list[str]:
    """Load statistics from ``path`` into the store; returns the layer names imported.

    Every tensor is validated (finite, variance >= 0, matching shapes, the
    layer's own shape) before anything is written.
    """
    spec = _naming(naming)
    tensors, info = _read(path)
    found = _group(tensors, spec)
    for name in info:
        found.setdefault(name, {})
    wanted = None if layers is None else set(_layer_names(store, layers))
    if wanted is not None:
        missing = wanted - set(found)
        if missing:
            raise InvalidArgument(f"{sorted(missing)} not in {os.fspath(path)!r}", field="layers")
        found = {k: v for k, v in found.items() if k in wanted}

    plan = {}
    for name, parts in sorted(found.items()):
        validate_name(name)
        meta = info.get(name, {})
        if ("mean" in parts) != ("variance" in parts):
            have, lack = ("mean", "variance") if "mean" in parts else ("variance", "mean")
            raise InvalidArgument(f"layer {name!r} has a {have} tensor but no {lack} tensor in the file",
                                  layer=name, field="path")
        mean = variance = None
        if "mean" in parts:
            mean = np.asarray(parts["mean"], dtype=np.float64)
            variance = np.asarray(parts["variance"], dtype=np.float64)
            if mean.shape != variance.shape:
                raise InvalidArgument(
                    f"layer {name!r}: mean shape {mean.shape} differs from variance shape {variance.shape}",
                    layer=name, field="path")
            if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(variance))):
                raise InvalidArgument(f"layer {name!r} has NaN or Inf statistics in the file", layer=name,
                                      field="path")
            if np.any(variance < 0):
                raise InvalidArgument(f"layer {name!r} has negative variances in the file", layer=name, field="path")
        num_batches = parts.get("num_batches")
        num_batches = int(np.asarray(num_batches).reshape(())) if num_batches is not None else meta.get("num_batches", 0)
        count = float(meta.get("count", 0.0))
        if num_batches < 0 or not (np.isfinite(count) and count >= 0):
            raise InvalidArgument(f"layer {name!r} has a negative count in the file", layer=name, field="path")
        if "config" in meta:
            try:
                config = LayerConfig.from_dict(meta["config"])
            except TypeError:
                raise InvalidArgument(f"layer {name!r} has a malformed config in the file", layer=name,
                                      field="path") from None
        else:
            config = make_config(convention=naming, axis=-1 if naming == "keras" else 1)
        plan[name] = (config, mean, variance, count, num_batches)

    existing = {name: store._backend.get(name) for name in plan}
    for name, (config, mean, *_rest) in plan.items():
        record = existing[name]
        shape = known_shape(record) if record is not None else config.declared_shape
        if record is not None and mean is None:
            continue
        if mean is not None and shape is not None and mean.shape != shape:
            raise InvalidArgument(
                f"layer {name!r} keeps statistics of shape {shape}: the file has shape {mean.shape}",
                layer=name, field="path")
    for name, (config, *_rest) in plan.items():
        if existing[name] is None:
            store._backend.insert(new_record(name, config))

    now = time.time()

    def fn(record):
        _, mean, variance, count, num_batches = plan[record.name]
        if mean is None:
            return None
        shape = known_shape(record)
        if shape is not None and shape != mean.shape:
            raise InvalidArgument(
                f"layer {record.name!r} keeps statistics of shape {shape}: the file has shape {mean.shape}",
                layer=record.name, field="path")
        stats = replace(record.stats, mean=mean.copy(), variance=variance.copy(), count=count,
                        num_batches=num_batches, version=record.stats.version + 1, updated_at=now)
        return replace(record, stats=stats)

    if plan:
        store._mutate(list(plan), fn)
    return list(plan)

