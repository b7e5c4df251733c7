"""normsvc/errors.py: the class table of the module docstring (code, parent, built-in bases), unique
reasons, the message/layer/field/reason attributes and ``moved()``."""

from __future__ import annotations

import grpc
import pytest

from normsvc import errors
from normsvc.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, InvalidTensor, InvalidType,
                            LayerNotFound, NormsvcError, ResourceExhausted, StoreError, Unavailable)

BUILTINS = (ValueError, TypeError, LookupError, PermissionError, TimeoutError)

# class name: (code, reason, direct normsvc parent, built-ins it derives from) -- the docstring's table
EXPECTED = {
    "InvalidArgument": ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "NormsvcError", {ValueError}),
    "InvalidType": ("INVALID_ARGUMENT", "INVALID_TYPE", "InvalidArgument", {ValueError, TypeError}),
    "InvalidTensor": ("INVALID_ARGUMENT", "INVALID_TENSOR", "InvalidArgument", {ValueError}),
    "LayerNotFound": ("NOT_FOUND", "LAYER_NOT_FOUND", "NormsvcError", {LookupError}),
    "AlreadyExists": ("ALREADY_EXISTS", "ALREADY_EXISTS", "NormsvcError", set()),
    "ConfigConflict": ("ALREADY_EXISTS", "CONFIG_CONFLICT", "AlreadyExists", set()),
    "FailedPrecondition": ("FAILED_PRECONDITION", "FAILED_PRECONDITION", "NormsvcError", set()),
    "FrozenLayer": ("FAILED_PRECONDITION", "FROZEN_LAYER", "FailedPrecondition", set()),
    "NoStatistics": ("FAILED_PRECONDITION", "NO_STATISTICS", "FailedPrecondition", set()),
    "ResourceExhausted": ("RESOURCE_EXHAUSTED", "LIMIT_EXCEEDED", "NormsvcError", set()),
    "TensorTooLarge": ("RESOURCE_EXHAUSTED", "TENSOR_TOO_LARGE", "ResourceExhausted", {ValueError}),
    "Unauthenticated": ("UNAUTHENTICATED", "UNAUTHENTICATED", "NormsvcError", {PermissionError}),
    "PermissionDenied": ("PERMISSION_DENIED", "PERMISSION_DENIED", "NormsvcError", {PermissionError}),
    "DeadlineExceeded": ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", "NormsvcError", {TimeoutError}),
    "Cancelled": ("CANCELLED", "CANCELLED", "NormsvcError", set()),
    "Unavailable": ("UNAVAILABLE", "UNAVAILABLE", "NormsvcError", set()),
    "StoreUnavailable": ("UNAVAILABLE", "STORE_UNAVAILABLE", "Unavailable", set()),
    "Internal": ("INTERNAL", "INTERNAL", "NormsvcError", set()),
}


def all_subclasses(cls) -> set:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | all_subclasses(sub)
    return out


def test_the_table_covers_every_class_and_export():
    assert set(errors.__all__) == {"NormsvcError", "StoreError", *EXPECTED}
    assert {c.__name__ for c in all_subclasses(NormsvcError) if c.__module__ == errors.__name__} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_code_reason_parent_and_builtins(name):
    cls = getattr(errors, name)
    code, reason, parent, builtins = EXPECTED[name]
    assert (cls.code, cls.reason) == (code, reason)
    assert grpc.StatusCode[cls.code].name == code
    assert issubclass(cls, getattr(errors, parent)) and issubclass(cls, NormsvcError)
    assert {b for b in BUILTINS if issubclass(cls, b)} == builtins
    err = cls("boom")
    assert isinstance(err, Exception) and (err.code, err.reason) == (code, reason)


def test_every_code_is_a_grpc_status_code_name():
    for cls in (NormsvcError, *all_subclasses(NormsvcError)):
        assert cls.code in grpc.StatusCode.__members__, cls
        assert grpc.StatusCode[cls.code] is not grpc.StatusCode.OK


def test_reasons_are_unique_and_upper_snake_case():
    reasons = [getattr(errors, name).reason for name in EXPECTED]
    assert len(reasons) == len(set(reasons))
    assert all(r.replace("_", "").isalpha() and r == r.upper() for r in reasons)
    # the base class travels as INTERNAL (only Internal shares its reason)
    assert (NormsvcError.code, NormsvcError.reason) == ("INTERNAL", "INTERNAL")


def test_store_error_is_the_base():
    assert StoreError is NormsvcError
    with pytest.raises(StoreError):
        raise LayerNotFound("no layer named 'x'", layer="x")


def test_attributes_and_str():
    err = InvalidArgument("momentum must be in [0, 1], got 1.5", layer="net/bn", field="momentum")
    assert (err.message, err.layer, err.field) == ("momentum must be in [0, 1], got 1.5", "net/bn", "momentum")
    assert str(err) == "momentum must be in [0, 1], got 1.5" and err.args == ("momentum must be in [0, 1], got 1.5",)
    assert err.reason == "INVALID_ARGUMENT" and err.description is None
    bare = Unavailable("down")
    assert (bare.layer, bare.field, str(bare)) == (None, None, "down")


def test_an_instance_reason_overrides_only_that_instance():
    err = AlreadyExists("rank 2 joined step 7 twice", reason="DUPLICATE_RANK")
    assert err.reason == "DUPLICATE_RANK" and err.code == "ALREADY_EXISTS"
    assert AlreadyExists.reason == "ALREADY_EXISTS" and AlreadyExists("again").reason == "ALREADY_EXISTS"


def test_generic_handlers_catch_them():
    with pytest.raises(ValueError):
        raise InvalidTensor("x: expected a float dtype", field="x")
    with pytest.raises(TypeError):
        raise InvalidType("momentum: expected a number, got 'x'", field="momentum")
    with pytest.raises(LookupError):
        raise LayerNotFound("no layer named 'x'", layer="x")
    for cls in (AlreadyExists, FailedPrecondition, ResourceExhausted, Unavailable):
        assert not issubclass(cls, ValueError)


def test_moved_rewrites_field_and_message_when_described():
    err = InvalidTensor("x: expected float16, float32 or float64, got int8", field="x")
    err.description = "expected float16, float32 or float64, got int8"
    err.moved("header.x")
    assert err.field == "header.x"
    assert err.message == str(err) == "header.x: expected float16, float32 or float64, got int8"


def test_moved_without_description_keeps_the_message():
    err = InvalidArgument("shape (2, 3) does not match (3,)", field="x")
    err.moved("header.x")
    assert err.field == "header.x" and err.message == str(err) == "shape (2, 3) does not match (3,)"
