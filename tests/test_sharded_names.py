"""What a user reads off a sharded collection names things as the unsharded one does: the keys a
load reports missing or unexpected, and the printed module (each lookup shown once)."""

import torch
import torch.distributed as dist
from dist_utils import run_multiprocess
from test_methods import CASES, SGD, _dmp
from torchrec.distributed.model_parallel import get_unwrapped_module

from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection


def _check_case(name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    dmp = _dmp(case, case.plans[0], SGD, case.module(torch.device("meta")), torch.device("cpu"))
    state = dmp.state_dict()
    # TorchRec's sharded EC cannot load with a table's key missing (a KeyError in its own hook):
    # QR (an EC inside) is checked on an unexpected key only
    dropped = None if name == "qr" else next(k for k in state if ".embedding_bags." in k)
    state = {k: v for k, v in state.items() if k != dropped}
    state["ebc.embedding_bags.bogus.weight"] = torch.zeros(1)
    result = dmp.load_state_dict(state, strict=False)
    # DMP reports a sharded module's keys relative to it (as for a stock EBC), ours by their public names
    assert list(result.missing_keys) == ([dropped.removeprefix("ebc.")] if dropped else []), result.missing_keys
    assert [k for k in result.unexpected_keys if "bogus" in k], result.unexpected_keys
    assert not [k for k in [*result.missing_keys, *result.unexpected_keys] if "_embedding_module" in k]
    text = repr(get_unwrapped_module(dmp).ebc)
    assert text.count("(lookups):") == 1, text  # the held stock module's, not again per wrapper


def _job(rank: int, world: int) -> None:
    for name in [c.name for c in CASES]:
        _check_case(name)
    dist.barrier()


def test_load_reports_unsharded_key_names_and_print_shows_each_lookup_once() -> None:
    run_multiprocess(_job, 1)


def test_unsharded_budgeted_reports_a_missing_tier_key_once() -> None:
    case = next(c for c in CASES if c.name == "budgeted")
    module = case.module(torch.device("cpu"))
    assert isinstance(module, BudgetedEmbeddingBagCollection)
    state = module.state_dict()
    key = next(k for k in state if k.startswith("embedding_bags."))
    del state[key]
    result = module.load_state_dict(state, strict=False)
    assert result.missing_keys == [key]
    assert result.unexpected_keys == []
