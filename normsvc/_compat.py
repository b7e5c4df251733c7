"""Old spellings of the public API that keep working, with a DeprecationWarning.

:func:`deprecated_property_method` turns what used to be a property into a
method without breaking the property spelling: anything that may go over the
wire is a method (``layer.config()``, like ``layer.stats()``), on
:class:`~normsvc.store.Layer` and :class:`~normsvc.client.RemoteLayer` alike,
and code that still writes ``layer.config`` gets the value and a warning::

    class Layer:
        @deprecated_property_method
        def config(self) -> LayerConfig:
            \"\"\"The layer's configuration.\"\"\"
            return ...

    layer.config()           # the method: no warning
    layer.config.epsilon     # the old property: works, warns DeprecationWarning
    layer.config == other    # likewise (also repr, str, hash)
    await alayer.config      # a method that returns an awaitable: likewise

Nothing here imports anything but the standard library, so any layer of the
package may use it.
"""

from __future__ import annotations

import inspect
import warnings

__all__ = ["deprecated_property_method", "PropertyMethod", "MethodValue"]


def deprecated_property_method(method):
    """Decorator: ``method`` is a method that still answers to its old property spelling.

    ``obj.name()`` calls ``method``.  ``obj.name`` gives a :class:`MethodValue`:
    calling it is the method call; using it as the value the property used to
    return (attribute access, ``==``, ``!=``, ``hash``, ``repr``, ``str``,
    ``await`` when ``method`` returns an awaitable) calls ``method`` once and
    warns DeprecationWarning.  On the class, ``Cls.name`` is the plain function
    (for ``help`` and documentation tools).
    """
    return PropertyMethod(method)


class PropertyMethod:
    """The descriptor :func:`deprecated_property_method` makes."""

    def __init__(self, method):
        self.method = method
        self.name = method.__name__
        self.__doc__ = method.__doc__

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self.method
        label = f"{type(instance).__name__}.{self.name}"
        return MethodValue(self.method.__get__(instance, owner), label)


class MethodValue:
    """``obj.name`` for a :func:`deprecated_property_method`: a call, or (deprecated) the value itself.

    The value is computed on first use as a value, not when the attribute is
    read, so the method spelling costs exactly one call.
    """

    __slots__ = ("_method", "_label", "_done", "_value")

    def __init__(self, method, label: str):
        self._method = method
        self._label = label
        self._done = False
        self._value = None

    def __call__(self, *args, **kwargs):
        return self._method(*args, **kwargs)

    def _deprecated(self):
        """The value, with the warning (``stacklevel`` points at the caller of the dunder)."""
        if not self._done:
            name = self._label.rsplit(".", 1)[-1]
            warnings.warn(
                f"{self._label} is a method: call {name}() (the property spelling "
                f"{name} without the call is deprecated and will be removed)",
                DeprecationWarning,
                stacklevel=3,
            )
            self._value, self._done = self._method(), True
        return self._value

    def __getattr__(self, attr: str):
        # introspection (copy, pickle, inspect.unwrap, numpy) must not go over the wire
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return getattr(self._deprecated(), attr)

    def __eq__(self, other):
        if isinstance(other, MethodValue):
            other = other()
        return self._deprecated() == other

    def __ne__(self, other):
        if isinstance(other, MethodValue):
            other = other()
        return self._deprecated() != other

    def __hash__(self):
        return hash(self._deprecated())

    def __repr__(self) -> str:
        return repr(self._deprecated())

    def __str__(self) -> str:
        return str(self._deprecated())

    def __await__(self):
        value = self._deprecated()
        if not inspect.isawaitable(value):
            raise TypeError(f"{self._label} returns {type(value).__name__}, which cannot be awaited")
        return value.__await__()
