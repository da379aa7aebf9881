"""The compression methods: importing this package registers every one of them
(``torchrec_memcom.registry``), in the order below, which is the order CLIs and benchmarks list
them in. A new method is a module here calling ``register_method``, and a line below."""

# isort: off
from torchrec_memcom.methods import memcom  # noqa: F401
from torchrec_memcom.methods import hash  # noqa: F401
from torchrec_memcom.methods import qr  # noqa: F401
from torchrec_memcom.methods import budgeted  # noqa: F401
# isort: on
