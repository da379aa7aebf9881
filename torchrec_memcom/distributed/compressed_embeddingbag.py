"""The sharded wrapper every compressed collection shares, in the shape of TorchRec's FP-EBC and
MC-EBC ones (``torchrec/distributed/fp_embeddingbag.py``, ``mc_embeddingbag.py``).

It holds the sharded module the stock sharder made over the collection's own tables (a
``ShardedEmbeddingBagCollection``, ``ShardedEmbeddingCollection``, or for budgeted tables the
sharded MEmCom collection of its tiers) and adds a method's work around it: ids transformed
before ``input_dist`` (no grad), distributed input transformed in ``compute``, the output in a
callback of ``output_dist``'s awaitable. Per-batch state lives in a typed context subclass.

The unsharded collections hold their tables directly (``embedding_bags.T.weight``), so the
wrapper shows the held module's state at its own paths: state-dict keys (and the keys a load
reports missing or unexpected), fused optimizer keys and parameter and module names are the
unsharded ones (as TorchRec's ``ShardedEmbeddingBag`` shows its lookup's), but for MEmCom's
per-entity scalars, which each rank holds in one flat parameter (``entity_weights.fused``,
``entity_weights.dense``) while their state-dict keys stay ``entity_weights.T``. The held module
stays a real submodule (``.to()``, ``.train()``, ``state_dict`` recursion); only
``named_modules`` lists its children in its place.
"""

import copy
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, TypeVar

import torch
from torch import nn
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.types import Awaitable, LazyAwaitable, Multistreamable, QuantizedCommCodecs
from torchrec.distributed.utils import append_prefix
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.distributed.stock_views import row_sharded_columns

C = TypeVar("C", bound=Multistreamable)

# The attribute holding the sharded module the method wraps (MC-EBC's name for it).
HELD = "_embedding_module"


class ShardedCompressedCollection(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, C],
    FusedOptimizerModule,
):
    """A compressed collection sharded as the sharded module it holds plus its method's work.

    Subclasses (one per method) override ``transform_input``, ``transform_dist_input`` and
    ``transform_output`` (identity here), ``create_context`` for per-batch state, and
    ``reset_parameters`` for state of their own; dense state they hold (trained by DMP's DDP)
    they name in ``dense_parameters``.

    Args:
        embedding_module: the sharded module the stock sharder made over the collection's
            tables (``embedding_bags.T.weight`` or ``embeddings.T.weight``).
        cost: the unsharded collection's ``cost()`` (global sizes, the same once sharded).
        qcomm_codecs_registry: as for TorchRec's sharded modules.

    Example::

        class ShardedMyCollection(ShardedCompressedCollection[EmbeddingBagCollectionContext]):
            def transform_input(self, features):
                return kjt_with(features, features.values() % self._rows, None)
    """

    def __init__(
        self,
        embedding_module: ShardedEmbeddingModule,
        cost: Dict[str, Dict[str, Any]],
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._embedding_module = embedding_module
        # TorchRec's ShardedEmbeddingModule pairs distributed inputs with `_lookups` (prefetch,
        # the train pipeline); FP-EBC shares its held module's alike.
        self._lookups: List[nn.Module] = embedding_module._lookups
        self._cost = cost
        self._row_sharded: Optional[torch.Tensor] = None  # see input_dist
        self._optim = CombinedOptimizer(fused_optimizers(embedding_module))
        self._load_prefix = ""  # this module's path in the load under way (see _lower_held_keys)
        self.register_state_dict_post_hook(_lift_held_keys)
        self.register_load_state_dict_pre_hook(_lower_held_keys)
        self.register_load_state_dict_post_hook(_lift_incompatible_keys)

    def add_fused_optimizer(self, optimizer: KeyedOptimizer) -> None:
        """Also step (and checkpoint) ``optimizer``, whose keys are relative to this module."""
        self._optim = CombinedOptimizer([("", self._optim), ("", optimizer)])

    # ---- the method's work (identity by default) --------------------------------------------

    def transform_input(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The KJT the held module distributes (runs under ``no_grad``)."""
        return features

    def transform_dist_input(self, ctx: C, dist_input: KJTList) -> KJTList:
        """The distributed input the held module looks up (runs with grad, after input_dist)."""
        return dist_input

    def transform_output(self, ctx: C, output: KeyedTensor) -> KeyedTensor:
        """The module's output from the held module's (a callback of its output awaitable)."""
        return output

    @property
    def dense_parameters(self) -> Set[str]:
        """Names of parameters of this module's own that DMP's DDP trains (none here)."""
        return set()

    # ---- ShardedModule ----------------------------------------------------------------------

    def create_context(self) -> C:
        return self._embedding_module.create_context()

    def input_dist(self, ctx: C, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        with torch.no_grad():
            features = self.transform_input(features)
        awaitable = self._embedding_module.input_dist(ctx, features)
        divisor = getattr(ctx, "divisor", None)  # MEAN pooling under a row-wise sharding
        if divisor is not None and isinstance(self._embedding_module, ShardedEmbeddingBagCollection):
            if self._row_sharded is None:
                self._row_sharded = row_sharded_columns(self._embedding_module, divisor.device)
            ctx.divisor = torch.where(self._row_sharded, divisor, torch.ones_like(divisor))
        return awaitable

    def compute(self, ctx: C, dist_input: KJTList) -> List[torch.Tensor]:
        return self._embedding_module.compute(ctx, self.transform_dist_input(ctx, dist_input))

    def output_dist(self, ctx: C, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        return self._then(ctx, self._embedding_module.output_dist(ctx, output))

    def compute_and_output_dist(self, ctx: C, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        held = self._embedding_module.compute_and_output_dist(ctx, self.transform_dist_input(ctx, input))
        return self._then(ctx, held)

    def _then(self, ctx: C, awaitable: LazyAwaitable[Any]) -> LazyAwaitable[KeyedTensor]:
        awaitable.callbacks.append(partial(self.transform_output, ctx))
        return awaitable

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optim

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        """Every parameter but the ``dense_parameters`` of this module and the held one's."""
        dense = self._all_dense()
        for name, _ in self.named_parameters(prefix):
            if name[len(prefix) + 1 if prefix else 0 :] not in dense:
                yield name

    def _all_dense(self) -> Set[str]:
        held = self._embedding_module
        inner = held._all_dense() if isinstance(held, ShardedCompressedCollection) else set()
        return self.dense_parameters | inner

    def reset_parameters(self) -> None:
        """The held module's tables (it is hidden from ``named_modules``, which DMP's reset
        walks); subclasses reset their own state after calling this."""
        self._embedding_module.reset_parameters()

    def cost(self) -> Dict[str, Dict[str, Any]]:
        """Same report as the unsharded module (global sizes)."""
        return copy.deepcopy(self._cost)

    # ---- the unsharded module's names -------------------------------------------------------

    def public_children(self) -> Iterator[Tuple[str, nn.Module]]:
        """The children the unsharded collection has: this module's own, and the held module's
        in its place."""
        for name, module in self._modules.items():
            if module is None:
                continue
            if name != HELD:
                yield name, module
            elif isinstance(module, ShardedCompressedCollection):
                yield from module.public_children()
            else:
                yield from ((n, m) for n, m in module._modules.items() if m is not None)

    def __getattr__(self, name: str) -> Any:
        """As ``nn.Module``'s, then the unsharded collection's children the held module has
        (``embedding_bags``, ``embeddings``, ``entity_weights``), as the unsharded one shows them."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or HELD not in self.__dict__.get("_modules", {}):
                raise
            children = dict(self.public_children())
            if name not in children:
                raise
            return children[name]

    def extra_repr(self) -> str:
        """Nothing of its own: the held module (printed below) shows the lookups."""
        return ""

    def named_modules(
        self, memo: Optional[Set[nn.Module]] = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[Tuple[str, nn.Module]]:
        """As ``nn.Module``'s, with the held module's children at this module's paths (so
        ``named_parameters``, ``named_buffers`` and DDP see the unsharded names)."""
        memo = set() if memo is None else memo
        if remove_duplicate:
            if self in memo:
                return
            memo.add(self)
        yield prefix, self
        for name, module in self.public_children():
            yield from module.named_modules(memo, append_prefix(prefix, name), remove_duplicate)


def fused_optimizers(module: nn.Module, path: str = "") -> List[Tuple[str, KeyedOptimizer]]:
    """The fused optimizers in ``module`` keyed by their paths, as DMP's walk finds them (a
    held module need not be one: TorchRec's sharded MC-EBC holds its sharded EBC's)."""
    if isinstance(module, FusedOptimizerModule):
        return [(path, module.fused_optimizer)]
    return [o for name, child in module.named_children() for o in fused_optimizers(child, append_prefix(path, name))]


def _lift_held_keys(module: nn.Module, destination: Dict[str, Any], prefix: str, _meta: Any) -> None:
    """State-dict hook: the held module's keys at this module's paths, in order."""
    held = f"{prefix}{HELD}."
    mine = [k for k in destination if k.startswith(prefix)]
    if not any(k.startswith(held) for k in mine):
        return
    items = [(k, destination.pop(k)) for k in mine]
    for key, value in items:
        destination[prefix + key[len(held) :] if key.startswith(held) else key] = value


def _lower_held_keys(module: ShardedCompressedCollection, state_dict: Dict[str, Any], prefix: str, *_args: Any) -> None:
    """Load pre-hook: keys of the held module's state back under it (all but this module's own)."""
    module._load_prefix = prefix
    own = {name for name in module._modules if name != HELD} | set(module._parameters) | set(module._buffers)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix) :].split(".", 1)[0] not in own:
            state_dict[f"{prefix}{HELD}.{key[len(prefix) :]}"] = state_dict.pop(key)


def _lift_incompatible_keys(module: ShardedCompressedCollection, keys: Any) -> None:
    """Load post-hook: missing and unexpected keys named as ``state_dict()`` names them."""
    held = f"{module._load_prefix}{HELD}."
    for names in (keys.missing_keys, keys.unexpected_keys):
        names[:] = [module._load_prefix + k[len(held) :] if k.startswith(held) else k for k in names]
