"""normsvc/_compat.py: a method that still answers to its old property spelling, with a warning."""

from __future__ import annotations

import asyncio
import copy
import warnings

import pytest

from normsvc._compat import deprecated_property_method


class Handle:
    def __init__(self, value):
        self.value = value
        self.calls = 0

    @deprecated_property_method
    def config(self):
        """The config."""
        self.calls += 1
        return self.value


class AsyncHandle:
    @deprecated_property_method
    async def config(self):
        return {"kind": "batch"}


def test_the_method_spelling_calls_once_without_a_warning():
    h = Handle((1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert h.config() == (1, 2)
        attribute = h.config
    assert h.calls == 1  # reading the attribute computes nothing
    assert attribute() == (1, 2) and h.calls == 2


def test_the_property_spelling_is_the_value_and_warns_once_per_use():
    h = Handle((1, 2))
    with pytest.warns(DeprecationWarning, match=r"Handle\.config is a method: call config\(\)") as record:
        value = h.config
        assert value == (1, 2) and value.count(1) == 1 and repr(value) == "(1, 2)" and str(value) == "(1, 2)"
        assert hash(value) == hash((1, 2)) and not value != (1, 2)
    assert len(record) == 1 and record[0].filename == __file__
    assert h.calls == 1  # the value is kept


def test_two_old_spellings_compare_by_value():
    with pytest.warns(DeprecationWarning):
        assert Handle([1]).config == Handle([1]).config
    with pytest.warns(DeprecationWarning):
        assert Handle([1]).config != Handle([2]).config


def test_introspection_does_not_compute_the_value():
    h = Handle(1)
    value = h.config
    assert not hasattr(value, "__wrapped__") and not hasattr(value, "__array__")
    copy.copy(value)
    assert h.calls == 0


def test_the_class_attribute_is_the_function():
    assert Handle.config.__doc__ == "The config." and Handle.config.__name__ == "config"
    assert Handle.config(Handle(3)) == 3


def test_awaitable_methods():
    async def main():
        h = AsyncHandle()
        assert await h.config() == {"kind": "batch"}
        with pytest.warns(DeprecationWarning, match="AsyncHandle.config is a method") as record:
            assert await h.config == {"kind": "batch"}
        assert record[0].filename == __file__

    asyncio.run(main())


def test_awaiting_a_plain_value_is_a_type_error():
    async def main():
        with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="cannot be awaited"):
            await Handle(1).config

    asyncio.run(main())
