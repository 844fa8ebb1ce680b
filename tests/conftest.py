import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """ckpt(shape, **options) -> (checkpoint dir, reference model); built once per session per variant."""
    pytest.importorskip("transformers")
    import reference

    made = {}

    def make(shape, **options):
        key = (shape, tuple(sorted(options.items())))
        if key not in made:
            out = str(tmp_path_factory.mktemp(f"{shape}-ckpt"))
            made[key] = (out, reference.build(shape, out, **options))
        return made[key]

    return make


@pytest.fixture
def no_kernels(monkeypatch):
    """GEMMA4_NO_KERNELS=1 for one test (read once per resolution: kernels.reset around it)."""
    from gemma4 import kernels

    monkeypatch.setenv("GEMMA4_NO_KERNELS", "1")
    kernels.reset()
    yield
    monkeypatch.delenv("GEMMA4_NO_KERNELS")
    kernels.reset()
