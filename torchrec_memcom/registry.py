"""The registry of compression methods: each method registers one ``CompressionMethod`` from its
own module (``torchrec_memcom/methods/<name>.py``), as PEFT's tuners call
``register_peft_method``; ``compress()``, export, the planner's callers, the CLIs and the
benchmarks iterate it (in registration order) instead of naming methods.

It imports nothing of ours, so any layer may read it; ``torchrec_memcom.methods`` fills it.
"""

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn
from torchrec.distributed.types import ModuleSharder
from torchrec.modules.embedding_configs import EmbeddingBagConfig

NONE = "none"  # the pseudo-method of tables left as they are

# A method builds a collection from the user's configs + {table: its config object} on a device ...
Builder = Callable[[List[EmbeddingBagConfig], Mapping[str, Any], torch.device], nn.Module]
# ... and makes the sharder of that collection from the fused (sparse optimizer) params.
SharderFactory = Callable[[Optional[Dict[str, Any]]], ModuleSharder]


@dataclasses.dataclass(frozen=True)
class CompressionMethod:
    """What ``compress()``, DMP, export and the tools need of one method.

    Args:
        name: the method's name in specs, YAML and CLIs (``method: memcom``).
        config: the dataclass each table's params make (``MEmComConfig(**params)``).
        collection: the unsharded collection type ``build`` returns.
        build: ``(tables, {table: config}, device) -> collection``.
        sharder: ``fused_params -> sharder`` of ``collection``.
        export: ``collection -> [table records]`` (``torchrec_memcom.inference.records``), the
            form inference and ``memcom export`` read its trained tables in (None: not exported).
        holds_plain_tables: the collection also holds plain tables (those it has no config for):
            a model whose tables use only this method and ``none`` then needs one collection.
        shared_config: one config for all of a collection's tables (budgeted: one budget).

    Example::

        register_method(CompressionMethod("hash", HashConfig, HashEmbeddingBagCollection,
                                          build, sharder, export, holds_plain_tables=True))
    """

    name: str
    config: type
    collection: type
    build: Builder
    sharder: SharderFactory
    export: Optional[Callable[[nn.Module], List[Any]]] = None
    holds_plain_tables: bool = False
    shared_config: bool = False


_METHODS: Dict[str, CompressionMethod] = {}


def register_method(method: CompressionMethod) -> CompressionMethod:
    """Add ``method`` (once: a second method of the same name or config class is refused)."""
    if method.name == NONE or method.name in _METHODS:
        raise ValueError(f"compression method {method.name!r} is already registered")
    owner = next((m.name for m in _METHODS.values() if m.config is method.config), None)
    if owner is not None:
        raise ValueError(f"{method.config.__name__} is already the config of method {owner!r}")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> CompressionMethod:
    """The method registered as ``name`` (KeyError naming the known ones otherwise)."""
    if name not in _METHODS:
        raise KeyError(f"unknown compression method {name!r}; known: {method_names()}")
    return _METHODS[name]


def methods() -> List[CompressionMethod]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())


def method_names(with_none: bool = False) -> List[str]:
    """The registered methods' names in registration order (``with_none``: ``none`` first)."""
    return ([NONE] if with_none else []) + list(_METHODS)


def method_of_config(config: Any) -> Optional[CompressionMethod]:
    """The method whose config class ``config`` is an instance of (None: no method's)."""
    return next((m for m in _METHODS.values() if isinstance(config, m.config)), None)


def method_of_collection(collection: nn.Module) -> Optional[CompressionMethod]:
    """The method whose collection type is exactly ``type(collection)`` (DMP's rule too)."""
    return next((m for m in _METHODS.values() if type(collection) is m.collection), None)
