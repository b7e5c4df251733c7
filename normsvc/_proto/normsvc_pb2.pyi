import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]

class LayerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYER_KIND_UNSPECIFIED: _ClassVar[LayerKind]
    LAYER_KIND_BATCH: _ClassVar[LayerKind]
    LAYER_KIND_LAYER: _ClassVar[LayerKind]
    LAYER_KIND_INSTANCE: _ClassVar[LayerKind]
    LAYER_KIND_GROUP: _ClassVar[LayerKind]
    LAYER_KIND_RMS: _ClassVar[LayerKind]

class Convention(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONVENTION_UNSPECIFIED: _ClassVar[Convention]
    CONVENTION_KERAS: _ClassVar[Convention]
    CONVENTION_TORCH: _ClassVar[Convention]
    CONVENTION_CUMULATIVE: _ClassVar[Convention]

class Naming(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NAMING_UNSPECIFIED: _ClassVar[Naming]
    NAMING_KERAS: _ClassVar[Naming]
    NAMING_TORCH: _ClassVar[Naming]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_TRAINING: _ClassVar[Mode]
    MODE_INFERENCE: _ClassVar[Mode]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_BFLOAT16: DType
LAYER_KIND_UNSPECIFIED: LayerKind
LAYER_KIND_BATCH: LayerKind
LAYER_KIND_LAYER: LayerKind
LAYER_KIND_INSTANCE: LayerKind
LAYER_KIND_GROUP: LayerKind
LAYER_KIND_RMS: LayerKind
CONVENTION_UNSPECIFIED: Convention
CONVENTION_KERAS: Convention
CONVENTION_TORCH: Convention
CONVENTION_CUMULATIVE: Convention
NAMING_UNSPECIFIED: Naming
NAMING_KERAS: Naming
NAMING_TORCH: Naming
MODE_UNSPECIFIED: Mode
MODE_TRAINING: Mode
MODE_INFERENCE: Mode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Moments(_message.Message):
    __slots__ = ("count", "mean", "variance")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VARIANCE_FIELD_NUMBER: _ClassVar[int]
    count: Tensor
    mean: Tensor
    variance: Tensor
    def __init__(self, count: _Optional[_Union[Tensor, _Mapping]] = ..., mean: _Optional[_Union[Tensor, _Mapping]] = ..., variance: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LayerConfig(_message.Message):
    __slots__ = ("kind", "axis", "groups", "epsilon", "momentum", "convention", "center", "scale", "num_features", "cumulative_average", "renorm", "renorm_rmin", "renorm_rmax", "renorm_dmax", "renorm_momentum", "virtual_batch_size")
    KIND_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    CONVENTION_FIELD_NUMBER: _ClassVar[int]
    CENTER_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    RENORM_FIELD_NUMBER: _ClassVar[int]
    RENORM_RMIN_FIELD_NUMBER: _ClassVar[int]
    RENORM_RMAX_FIELD_NUMBER: _ClassVar[int]
    RENORM_DMAX_FIELD_NUMBER: _ClassVar[int]
    RENORM_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    kind: LayerKind
    axis: _containers.RepeatedScalarFieldContainer[int]
    groups: int
    epsilon: float
    momentum: float
    convention: Convention
    center: bool
    scale: bool
    num_features: _containers.RepeatedScalarFieldContainer[int]
    cumulative_average: bool
    renorm: bool
    renorm_rmin: float
    renorm_rmax: float
    renorm_dmax: float
    renorm_momentum: float
    virtual_batch_size: int
    def __init__(self, kind: _Optional[_Union[LayerKind, str]] = ..., axis: _Optional[_Iterable[int]] = ..., groups: _Optional[int] = ..., epsilon: _Optional[float] = ..., momentum: _Optional[float] = ..., convention: _Optional[_Union[Convention, str]] = ..., center: _Optional[bool] = ..., scale: _Optional[bool] = ..., num_features: _Optional[_Iterable[int]] = ..., cumulative_average: _Optional[bool] = ..., renorm: _Optional[bool] = ..., renorm_rmin: _Optional[float] = ..., renorm_rmax: _Optional[float] = ..., renorm_dmax: _Optional[float] = ..., renorm_momentum: _Optional[float] = ..., virtual_batch_size: _Optional[int] = ...) -> None: ...

class RunningStats(_message.Message):
    __slots__ = ("mean", "variance", "count", "num_batches", "version", "frozen", "updated_at", "run", "last_step", "moving_stddev", "renorm_mean", "renorm_stddev")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VARIANCE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    MOVING_STDDEV_FIELD_NUMBER: _ClassVar[int]
    RENORM_MEAN_FIELD_NUMBER: _ClassVar[int]
    RENORM_STDDEV_FIELD_NUMBER: _ClassVar[int]
    mean: Tensor
    variance: Tensor
    count: float
    num_batches: int
    version: int
    frozen: bool
    updated_at: _timestamp_pb2.Timestamp
    run: str
    last_step: int
    moving_stddev: Tensor
    renorm_mean: Tensor
    renorm_stddev: Tensor
    def __init__(self, mean: _Optional[_Union[Tensor, _Mapping]] = ..., variance: _Optional[_Union[Tensor, _Mapping]] = ..., count: _Optional[float] = ..., num_batches: _Optional[int] = ..., version: _Optional[int] = ..., frozen: _Optional[bool] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., run: _Optional[str] = ..., last_step: _Optional[int] = ..., moving_stddev: _Optional[_Union[Tensor, _Mapping]] = ..., renorm_mean: _Optional[_Union[Tensor, _Mapping]] = ..., renorm_stddev: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("name", "config", "stats")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: LayerConfig
    stats: RunningStats
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Union[LayerConfig, _Mapping]] = ..., stats: _Optional[_Union[RunningStats, _Mapping]] = ...) -> None: ...

class LayerMoments(_message.Message):
    __slots__ = ("layer", "moments")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MOMENTS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    moments: Moments
    def __init__(self, layer: _Optional[str] = ..., moments: _Optional[_Union[Moments, _Mapping]] = ...) -> None: ...

class LayerStats(_message.Message):
    __slots__ = ("layer", "stats")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    stats: RunningStats
    def __init__(self, layer: _Optional[str] = ..., stats: _Optional[_Union[RunningStats, _Mapping]] = ...) -> None: ...

class CreateLayerRequest(_message.Message):
    __slots__ = ("name", "config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: LayerConfig
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Union[LayerConfig, _Mapping]] = ...) -> None: ...

class CreateLayerResponse(_message.Message):
    __slots__ = ("layer",)
    LAYER_FIELD_NUMBER: _ClassVar[int]
    layer: Layer
    def __init__(self, layer: _Optional[_Union[Layer, _Mapping]] = ...) -> None: ...

class GetLayerRequest(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class GetLayerResponse(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ...) -> None: ...

class ListLayersRequest(_message.Message):
    __slots__ = ("prefix", "page_size", "page_token", "include_stats")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STATS_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    page_size: int
    page_token: str
    include_stats: bool
    def __init__(self, prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_stats: _Optional[bool] = ...) -> None: ...

class ListLayersResponse(_message.Message):
    __slots__ = ("layers", "next_page_token")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    next_page_token: str
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteLayerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteLayerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetStatsRequest(_message.Message):
    __slots__ = ("name", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ResetStatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: RunningStats
    def __init__(self, stats: _Optional[_Union[RunningStats, _Mapping]] = ...) -> None: ...

class PackedMoments(_message.Message):
    __slots__ = ("layers", "ndim", "dims", "count", "mean", "variance")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NDIM_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VARIANCE_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[str]
    ndim: _containers.RepeatedScalarFieldContainer[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    count: _containers.RepeatedScalarFieldContainer[float]
    mean: Tensor
    variance: Tensor
    def __init__(self, layers: _Optional[_Iterable[str]] = ..., ndim: _Optional[_Iterable[int]] = ..., dims: _Optional[_Iterable[int]] = ..., count: _Optional[_Iterable[float]] = ..., mean: _Optional[_Union[Tensor, _Mapping]] = ..., variance: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PackedStats(_message.Message):
    __slots__ = ("layers", "ndim", "dims", "mean", "variance", "count", "num_batches", "version", "frozen", "updated_at", "run", "last_step", "renorm", "moving_stddev", "renorm_mean", "renorm_stddev")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NDIM_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VARIANCE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    RENORM_FIELD_NUMBER: _ClassVar[int]
    MOVING_STDDEV_FIELD_NUMBER: _ClassVar[int]
    RENORM_MEAN_FIELD_NUMBER: _ClassVar[int]
    RENORM_STDDEV_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[str]
    ndim: _containers.RepeatedScalarFieldContainer[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    mean: Tensor
    variance: Tensor
    count: _containers.RepeatedScalarFieldContainer[float]
    num_batches: _containers.RepeatedScalarFieldContainer[int]
    version: _containers.RepeatedScalarFieldContainer[int]
    frozen: _containers.RepeatedScalarFieldContainer[bool]
    updated_at: _containers.RepeatedScalarFieldContainer[float]
    run: _containers.RepeatedScalarFieldContainer[str]
    last_step: _containers.RepeatedScalarFieldContainer[int]
    renorm: _containers.RepeatedScalarFieldContainer[bool]
    moving_stddev: Tensor
    renorm_mean: Tensor
    renorm_stddev: Tensor
    def __init__(self, layers: _Optional[_Iterable[str]] = ..., ndim: _Optional[_Iterable[int]] = ..., dims: _Optional[_Iterable[int]] = ..., mean: _Optional[_Union[Tensor, _Mapping]] = ..., variance: _Optional[_Union[Tensor, _Mapping]] = ..., count: _Optional[_Iterable[float]] = ..., num_batches: _Optional[_Iterable[int]] = ..., version: _Optional[_Iterable[int]] = ..., frozen: _Optional[_Iterable[bool]] = ..., updated_at: _Optional[_Iterable[float]] = ..., run: _Optional[_Iterable[str]] = ..., last_step: _Optional[_Iterable[int]] = ..., renorm: _Optional[_Iterable[bool]] = ..., moving_stddev: _Optional[_Union[Tensor, _Mapping]] = ..., renorm_mean: _Optional[_Union[Tensor, _Mapping]] = ..., renorm_stddev: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class UpdateStatsRequest(_message.Message):
    __slots__ = ("updates", "packed", "request_id", "step", "rank", "world_size", "run")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[LayerMoments]
    packed: PackedMoments
    request_id: str
    step: int
    rank: int
    world_size: int
    run: str
    def __init__(self, updates: _Optional[_Iterable[_Union[LayerMoments, _Mapping]]] = ..., packed: _Optional[_Union[PackedMoments, _Mapping]] = ..., request_id: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., run: _Optional[str] = ...) -> None: ...

class UpdateStatsResponse(_message.Message):
    __slots__ = ("stats", "packed")
    STATS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    stats: _containers.RepeatedCompositeFieldContainer[LayerStats]
    packed: PackedStats
    def __init__(self, stats: _Optional[_Iterable[_Union[LayerStats, _Mapping]]] = ..., packed: _Optional[_Union[PackedStats, _Mapping]] = ...) -> None: ...

class AllReduceMomentsRequest(_message.Message):
    __slots__ = ("group", "step", "rank", "world_size", "moments", "update_stats", "run", "wait_seconds")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MOMENTS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_STATS_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    group: str
    step: int
    rank: int
    world_size: int
    moments: _containers.RepeatedCompositeFieldContainer[LayerMoments]
    update_stats: bool
    run: str
    wait_seconds: float
    def __init__(self, group: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., moments: _Optional[_Iterable[_Union[LayerMoments, _Mapping]]] = ..., update_stats: _Optional[bool] = ..., run: _Optional[str] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class AllReduceMomentsResponse(_message.Message):
    __slots__ = ("global_moments", "stats")
    GLOBAL_MOMENTS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    global_moments: _containers.RepeatedCompositeFieldContainer[LayerMoments]
    stats: _containers.RepeatedCompositeFieldContainer[LayerStats]
    def __init__(self, global_moments: _Optional[_Iterable[_Union[LayerMoments, _Mapping]]] = ..., stats: _Optional[_Iterable[_Union[LayerStats, _Mapping]]] = ...) -> None: ...

class WatchLayerRequest(_message.Message):
    __slots__ = ("names", "skip_initial")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    SKIP_INITIAL_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    skip_initial: bool
    def __init__(self, names: _Optional[_Iterable[str]] = ..., skip_initial: _Optional[bool] = ...) -> None: ...

class WatchLayerResponse(_message.Message):
    __slots__ = ("layer", "stats")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    stats: RunningStats
    def __init__(self, layer: _Optional[str] = ..., stats: _Optional[_Union[RunningStats, _Mapping]] = ...) -> None: ...

class NormalizeRequest(_message.Message):
    __slots__ = ("layer", "x", "mode", "update", "gamma", "beta", "request_id")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    layer: str
    x: Tensor
    mode: Mode
    update: bool
    gamma: Tensor
    beta: Tensor
    request_id: str
    def __init__(self, layer: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., mode: _Optional[_Union[Mode, str]] = ..., update: _Optional[bool] = ..., gamma: _Optional[_Union[Tensor, _Mapping]] = ..., beta: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class NormalizeResponse(_message.Message):
    __slots__ = ("y", "batch_moments", "stats")
    Y_FIELD_NUMBER: _ClassVar[int]
    BATCH_MOMENTS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    y: Tensor
    batch_moments: Moments
    stats: RunningStats
    def __init__(self, y: _Optional[_Union[Tensor, _Mapping]] = ..., batch_moments: _Optional[_Union[Moments, _Mapping]] = ..., stats: _Optional[_Union[RunningStats, _Mapping]] = ...) -> None: ...

class NormalizeStreamHeader(_message.Message):
    __slots__ = ("layer", "dtype", "shape", "mode", "update", "gamma", "beta", "request_id")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    layer: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    mode: Mode
    update: bool
    gamma: Tensor
    beta: Tensor
    request_id: str
    def __init__(self, layer: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., mode: _Optional[_Union[Mode, str]] = ..., update: _Optional[bool] = ..., gamma: _Optional[_Union[Tensor, _Mapping]] = ..., beta: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class NormalizeStreamRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: NormalizeStreamHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[NormalizeStreamHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class NormalizeStreamResult(_message.Message):
    __slots__ = ("dtype", "shape", "batch_moments", "stats")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BATCH_MOMENTS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    batch_moments: Moments
    stats: RunningStats
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., batch_moments: _Optional[_Union[Moments, _Mapping]] = ..., stats: _Optional[_Union[RunningStats, _Mapping]] = ...) -> None: ...

class NormalizeStreamResponse(_message.Message):
    __slots__ = ("result", "chunk")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    result: NormalizeStreamResult
    chunk: bytes
    def __init__(self, result: _Optional[_Union[NormalizeStreamResult, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class FreezeRequest(_message.Message):
    __slots__ = ("name", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class FreezeResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: RunningStats
    def __init__(self, stats: _Optional[_Union[RunningStats, _Mapping]] = ...) -> None: ...

class UnfreezeRequest(_message.Message):
    __slots__ = ("name", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class UnfreezeResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: RunningStats
    def __init__(self, stats: _Optional[_Union[RunningStats, _Mapping]] = ...) -> None: ...

class ExportStatsRequest(_message.Message):
    __slots__ = ("names", "naming", "dtype", "prefix", "strip_prefix")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    NAMING_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    STRIP_PREFIX_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    naming: Naming
    dtype: DType
    prefix: str
    strip_prefix: str
    def __init__(self, names: _Optional[_Iterable[str]] = ..., naming: _Optional[_Union[Naming, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., prefix: _Optional[str] = ..., strip_prefix: _Optional[str] = ...) -> None: ...

class ExportStatsResponse(_message.Message):
    __slots__ = ("safetensors", "layers")
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    safetensors: bytes
    layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, safetensors: _Optional[bytes] = ..., layers: _Optional[_Iterable[str]] = ...) -> None: ...

class ImportStatsRequest(_message.Message):
    __slots__ = ("safetensors", "naming", "names", "add_prefix")
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    NAMING_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    ADD_PREFIX_FIELD_NUMBER: _ClassVar[int]
    safetensors: bytes
    naming: Naming
    names: _containers.RepeatedScalarFieldContainer[str]
    add_prefix: str
    def __init__(self, safetensors: _Optional[bytes] = ..., naming: _Optional[_Union[Naming, str]] = ..., names: _Optional[_Iterable[str]] = ..., add_prefix: _Optional[str] = ...) -> None: ...

class ImportStatsResponse(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, layers: _Optional[_Iterable[str]] = ...) -> None: ...
