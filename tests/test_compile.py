"""`optimize: compile` is opt-in: the gate compiles and warms the module, which then answers like eager."""

from __future__ import annotations

import pytest
import torch
from conftest import Project, colours_yaml

from reloader.batching import forward
from reloader.config import load_config
from reloader.gate import Gate
from reloader.images import stack_images
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


@pytest.mark.torch_compile
def test_once_live_a_compiled_model_serves_every_batch_size_without_compiling_again(project: Project):
    """Serving's batches are stacked channels last as inference tensors (images.stack_images), at 1 to max_size
    images; a compiled graph guards on all of that, and a batch it had not seen compiled again in the serving
    path: 15.7 s for resnet18's first served batch here, 4.5 s more for its first batch of one."""
    options = "    optimize: compile\n    batch: {max_size: 4}\n"
    project.write_config(colours_yaml().replace("    version: latest\n", "    version: latest\n" + options))
    config = load_config(project.config).models["colours"]
    judged = Gate("colours", config, prepare_module).judge(project.save("colours-v1.pt"))
    assert judged.report.passed, judged.report.reason

    with torch._dynamo.config.patch(error_on_recompile=True):
        for size in (4, 3, 1, 2):
            batch = stack_images([torch.rand(3, 32, 32) for _ in range(size)])
            assert forward(judged, batch).shape == (size, 3)


@pytest.mark.torch_compile
@pytest.mark.parametrize("form", ["autocast", "weights"])
def test_under_compile_each_bf16_form_is_compiled_with_freezing_and_answers_like_its_eager_self(form, monkeypatch):
    from tinynet import colour_net, colour_state_dict

    from reloader.precision import build

    compiles: list[dict] = []
    real_compile = torch.compile

    def recording(module, **kwargs):
        compiles.append(kwargs)
        return real_compile(module, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    fp32 = colour_net()
    fp32.load_state_dict(colour_state_dict())
    fp32.eval().requires_grad_(False)
    calibration = torch.randn(4, 3, 32, 32)

    compiled = build(fp32, "bf16", form, "cpu", calibration, compile_side=32)
    eager = build(fp32, "bf16", form, "cpu", calibration)

    assert compiles == [{"dynamic": True, "options": {"freezing": True}}]
    assert hasattr(compiled, "_orig_mod") and not hasattr(eager, "_orig_mod")
    torch.manual_seed(1)
    for size in (1, 3, 8):
        batch = torch.randn(size, 3, 32, 32)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(batch), eager(batch), rtol=0.02, atol=0.05)


@pytest.mark.torch_compile
def test_serving_goes_on_while_a_module_compiles_and_never_runs_while_torch_fx_traces():
    """A compile takes seconds to minutes (64 s for resnet18 here). Serving's forward lock is held only
    while torch.fx traces, which patches nn.Module for every thread; before, it was held throughout.

    The compile waits, as it starts, for a live forward pass begun after it started (up to a deadline,
    which it only reaches if the lock is held); the live pass checks nn.Module is not patched."""
    import threading

    from tinynet import colour_net, colour_state_dict
    from torch._dynamo import callback

    from reloader.compute import run_forward
    from reloader.optimize import compile_module

    torch._dynamo.reset()  # a graph another test compiled in this process would not compile again
    live = colour_net().eval().requires_grad_(False)
    live.load_state_dict(colour_state_dict())
    candidate = colour_net().eval().requires_grad_(False)
    candidate.load_state_dict(colour_state_dict(scale=2.0))
    batch = torch.rand(2, 3, 32, 32)
    expected = run_forward(live, batch)
    unpatched = torch.nn.Module.__call__
    calls_seen: list[bool] = []
    live.register_forward_pre_hook(lambda module, args: calls_seen.append(torch.nn.Module.__call__ is unpatched))
    compiling, served_meanwhile, done = threading.Event(), threading.Event(), threading.Event()
    compiles = [0]  # started so far
    wrong: list[torch.Tensor] = []

    def serve() -> None:
        while not done.is_set():
            began = compiling.is_set(), compiles[0]
            answer = run_forward(live, batch)
            if not torch.equal(answer, expected):
                wrong.append(answer)
            if began[0] and (compiling.is_set(), compiles[0]) == began:  # begun and ended in one compile
                served_meanwhile.set()

    def started(args: object) -> None:
        compiles[0] += 1
        compiling.set()
        served_meanwhile.wait(timeout=30.0)

    def ended(args: object) -> None:
        compiling.clear()

    callback.on_compile_start(started)
    callback.on_compile_end(ended)
    serving = threading.Thread(target=serve, name="test-serving")
    serving.start()
    try:
        compiled = compile_module(candidate, 32, 4)
    finally:
        done.set()
        serving.join()
        callback.callback_handler.remove_start_callback(started)
        callback.callback_handler.remove_end_callback(ended)

    assert compiles[0] > 0, "nothing compiled"
    assert served_meanwhile.is_set(), "no forward pass of the live model ran while the candidate compiled"
    assert wrong == []
    assert calls_seen and all(calls_seen), "a live forward pass ran while torch.fx had nn.Module patched"
    torch.testing.assert_close(run_forward(compiled, batch), run_forward(candidate, batch))


def test_compile_without_a_cpp_compiler_is_a_config_error_naming_the_key(project: Project):
    """Not a warm-up failure with Inductor's error for every file: the container image has no g++."""
    import torch._inductor.config as inductor_config

    from reloader.errors import ConfigError

    compiled = colours_yaml().replace("    version: latest\n", "    version: latest\n    optimize: compile\n")
    project.write_config(compiled)
    config = load_config(project.config).models["colours"]
    with (
        inductor_config.patch({"cpp.cxx": ("no-such-c++",)}),
        pytest.raises(ConfigError, match=r"^models\.colours\.optimize: compile needs a C\+\+ compiler for Inductor"),
    ):
        Gate("colours", config, prepare_module)
    assert Gate("colours", config, prepare_module).config.optimize == "compile"  # g++ is here
