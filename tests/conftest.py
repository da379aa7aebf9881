"""Shared fixtures: small table configs and random KJTs with ragged and empty bags."""

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

REPO = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = REPO.parent / "shared" / "data" / "criteo_kaggle_sample_8k.tsv"


def small_tables(dim: int = 8) -> List[EmbeddingBagConfig]:
    """Two single-feature tables and one shared by two features."""
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=dim, num_embeddings=1000, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=dim, num_embeddings=400, feature_names=["f1"]),
        EmbeddingBagConfig(name="t2", embedding_dim=dim, num_embeddings=60, feature_names=["f2", "f3"]),
    ]


def random_kjt(tables: List[EmbeddingBagConfig], batch: int, seed: int, max_len: int = 4) -> KeyedJaggedTensor:
    """A KJT over every feature, bag lengths in [0, max_len] (so some bags are empty)."""
    g = torch.Generator().manual_seed(seed)
    keys, values, lengths = [], [], []
    for t in tables:
        for f in t.feature_names:
            ln = torch.randint(0, max_len + 1, (batch,), generator=g)
            keys.append(f)
            lengths.append(ln)
            values.append(torch.randint(0, t.num_embeddings, (int(ln.sum()),), generator=g))
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))


def batch_slice(kjt: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    """Examples ``[start, stop)`` of every feature of ``kjt``."""
    d = kjt.to_dict()
    values, lengths = [], []
    for k in kjt.keys():
        jt = d[k]
        off = jt.offsets()
        lengths.append(jt.lengths()[start:stop])
        values.append(jt.values()[off[start] : off[stop]])
    return KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=torch.cat(values), lengths=torch.cat(lengths))


def assert_matches_reference(
    module: torch.nn.Module,
    tables: List[EmbeddingBagConfig],
    reference: Callable[
        [Dict[str, torch.Tensor], List[EmbeddingBagConfig], torch.nn.Module, KeyedJaggedTensor], Dict[str, torch.Tensor]
    ],
) -> None:
    """Outputs and parameter gradients of ``module`` equal a plain-PyTorch ``reference`` built
    from its own state dict (integer buffers included), on random ids with ragged and empty bags."""
    state = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in module.state_dict().items()}
    kjt = random_kjt(tables, batch=6, seed=1)
    out = module(kjt).to_dict()
    ref = reference(state, tables, module, kjt)
    g = torch.Generator().manual_seed(2)
    loss, ref_loss = torch.zeros(()), torch.zeros(())
    for f in ref:
        torch.testing.assert_close(out[f], ref[f])
        weight = torch.randn(ref[f].shape, generator=g)
        loss = loss + (out[f] * weight).sum()
        ref_loss = ref_loss + (ref[f] * weight).sum()
    assert any(bool((b == 0).all()) for f in out for b in out[f]), "no empty bag exercised"
    loss.backward()
    ref_loss.backward()
    params = dict(module.named_parameters())
    assert set(params) == {k for k, v in state.items() if v.is_floating_point()}
    for k, p in params.items():
        torch.testing.assert_close(p.grad.view_as(state[k]), state[k].grad, msg=k)


def optimizer_state_bytes(module: torch.nn.Module, optimizer: Optional[str]) -> int:
    """Bytes of the state TorchRec's ``RowWiseAdagrad`` or torch's ``Adagrad`` keeps after a step
    on copies of ``module``'s sparse parameters (all but budgeted projections, which are dense):
    an independent count of what a fused sparse optimizer holds for tables of these shapes."""
    if optimizer in (None, "sgd"):
        return 0
    params = [
        torch.nn.Parameter(p.detach().cpu().clone())
        for name, p in module.named_parameters()
        if not name.startswith("projections.")
    ]
    step = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad}[optimizer](params, lr=0.1)
    for p in params:
        p.grad = torch.zeros_like(p)
    step.step()
    return sum(s["sum"].numel() * s["sum"].element_size() for s in step.state.values())


@pytest.fixture
def criteo_sample() -> Path:
    if not CRITEO_SAMPLE.exists():
        pytest.skip(f"real Criteo sample not found at {CRITEO_SAMPLE}")
    return CRITEO_SAMPLE


def flat_checkpoint(checkpoint: Path, out: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint folder by its dotted key (via ``out``, a torch.save file)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, out)
    flat: Dict[str, torch.Tensor] = {}

    def walk(d: Dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                flat[prefix + k] = v

    walk(torch.load(out, weights_only=True), "")
    return flat
