"""`optimize: compile` is opt-in: the gate compiles and warms the module, which then answers like eager."""

from __future__ import annotations

import pytest
import torch
from conftest import Project, colours_yaml

from reloader.batching import forward
from reloader.config import load_config
from reloader.gate import Gate
from reloader.optimize import prepare_module


@pytest.mark.torch_compile
def test_a_compiled_model_passes_the_gate_and_answers_like_the_eager_one(project: Project):
    checkpoint = project.save("colours-v1.pt")
    project.write_config(
        colours_yaml().replace("    version: latest\n", "    version: latest\n    optimize: compile\n")
    )
    compiled_config = load_config(project.config).models["colours"]
    eager_config = compiled_config.model_copy(update={"optimize": "none"})

    compiled = Gate("colours", compiled_config, prepare_module).judge(checkpoint)
    eager = Gate("colours", eager_config, prepare_module).judge(checkpoint)

    assert compiled.report.passed, compiled.report.reason
    assert compiled.module is not None and eager.module is not None
    assert compiled.module is not eager.module
    assert hasattr(compiled.module, "_orig_mod")  # what torch.compile wraps a module in
    torch.manual_seed(0)
    for size in (1, 3, 8):
        batch = torch.randn(size, 3, 32, 32)
        torch.testing.assert_close(forward(compiled, batch), forward(eager, batch), rtol=1e-4, atol=1e-5)
