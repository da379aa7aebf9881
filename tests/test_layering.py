"""The layering rule: ``modules/`` and ``distributed/`` never import the layers above them."""

import ast
from pathlib import Path
from typing import List

import torchrec_memcom

PACKAGE = Path(torchrec_memcom.__file__).parent
LOWER = ("modules", "distributed")
HIGHER = ("budget", "data", "train", "export", "inference", "methods")


def imported_modules(source: str, module: str) -> List[str]:
    """Every module ``source`` (the module named ``module``) imports, at any depth (function-local
    imports included), relative imports resolved; ``from pkg import name`` also as ``pkg.name``."""
    package = module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out += [base, *(f"{base}.{a.name}" for a in node.names)]
    return out


def upward(names: List[str]) -> List[str]:
    """The names that are, or are inside, a higher layer of the package."""
    return sorted(
        {n for n in names if any(n == f"torchrec_memcom.{h}" or n.startswith(f"torchrec_memcom.{h}.") for h in HIGHER)}
    )


def test_checker_sees_local_relative_and_from_imports() -> None:
    source = (
        "import torch\n"
        "from torchrec_memcom import data\n"
        "def f():\n"
        "    from torchrec_memcom.budget.space import AllocationSpace\n"
        "    from ..methods import budgeted\n"
    )
    found = upward(imported_modules(source, "torchrec_memcom.modules.x"))
    assert found == [
        "torchrec_memcom.budget.space",
        "torchrec_memcom.budget.space.AllocationSpace",
        "torchrec_memcom.data",
        "torchrec_memcom.methods",
        "torchrec_memcom.methods.budgeted",
    ]


def test_lower_layers_import_no_higher_layer() -> None:
    files = [f for layer in LOWER for f in sorted((PACKAGE / layer).rglob("*.py"))]
    assert len(files) > 10  # the layers were found
    bad = {}
    for f in files:
        module = ".".join(("torchrec_memcom", *f.relative_to(PACKAGE).with_suffix("").parts))
        names = upward(imported_modules(f.read_text(), module))
        if names:
            bad[str(f.relative_to(PACKAGE.parent))] = names
    assert not bad, f"modules/ and distributed/ import higher layers: {bad}"
