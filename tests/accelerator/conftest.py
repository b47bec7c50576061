"""tests/accelerator: checks that need a GPU or TPU (bigger models, bf16 on real hardware).

Every test here is marked ``gpu`` and skipped, with this message, when jax's backend is the
CPU. On an accelerator: ``pytest -m gpu tests/accelerator``.
"""

import jax
import pytest

SKIP_MESSAGE = (
    "tests/accelerator needs a GPU or TPU (jax.default_backend() is 'cpu'); "
    "run `pytest -m gpu tests/accelerator` on an accelerator machine"
)


@pytest.fixture(autouse=True)
def _needs_accelerator():
    if jax.default_backend() == "cpu":
        pytest.skip(SKIP_MESSAGE)
