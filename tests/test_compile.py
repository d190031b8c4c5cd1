"""`optimize: compile` is opt-in: the gate compiles the module, which then answers like eager. Once the server
serves, a definition its process has not compiled yet compiles ahead of time in a child process (where that
fails, in its own); before, and for a definition compiled before, in its own."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import Project, colours_yaml, sha256, wait_until

from reloader import optimize, packages
from reloader.batching import forward
from reloader.config import load_config
from reloader.gate import Gate
from reloader.images import stack_images
from reloader.optimize import prepare_module
from reloader.packages import BuildFailed, Packaged


@pytest.fixture
def serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a server past its initial load that has compiled nothing yet."""
    started = threading.Event()
    started.set()
    monkeypatch.setattr(optimize, "SERVING", started)
    monkeypatch.setattr(optimize, "_compiled_here", set())


@pytest.mark.torch_compile
def test_a_compiled_model_passes_the_gate_and_answers_like_the_eager_one(project: Project, serving):
    checkpoint = project.save("colours-v1.pt")
    project.write_config(
        colours_yaml().replace("    version: latest\n", "    version: latest\n    optimize: compile\n")
    )
    compiled_config = load_config(project.config).models["colours"]
    eager_config = compiled_config.model_copy(update={"optimize": "none"})

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = Gate("colours", compiled_config, prepare_module).judge(checkpoint)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # this process compiled nothing
    eager = Gate("colours", eager_config, prepare_module).judge(checkpoint)

    assert compiled.report.passed, compiled.report.reason
    assert compiled.module is not None and eager.module is not None
    assert isinstance(compiled.module, Packaged)  # built by a child process, loaded here
    assert compiled.module._orig_mod is not eager.module  # the eager module it was built from, as torch.compile
    torch.manual_seed(0)
    for size in (1, 3, 8):
        batch = torch.randn(size, 3, 32, 32)
        torch.testing.assert_close(forward(compiled, batch), forward(eager, batch), rtol=1e-4, atol=1e-5)


@pytest.mark.torch_compile
def test_a_model_compiled_in_process_serves_every_batch_size_without_compiling_again(
    project: Project, serving, monkeypatch, caplog
):
    """Where the child process fails, the gate compiles in its own. Serving's batches are stacked channels
    last as inference tensors (images.stack_images), at 1 to max_size images; a compiled graph guards on all
    of that, and a batch it had not seen compiled again in the serving path: 15.7 s for resnet18's first
    served batch here, 4.5 s more for its first batch of one."""

    def failing(*args: object, **kwargs: object) -> None:
        raise BuildFailed("the ahead-of-time compile failed (exit code 1): out of luck")

    monkeypatch.setattr(packages, "compiled", failing)
    options = "    optimize: compile\n    batch: {max_size: 4}\n"
    project.write_config(colours_yaml().replace("    version: latest\n", "    version: latest\n" + options))
    config = load_config(project.config).models["colours"]
    judged = Gate("colours", config, prepare_module).judge(project.save("colours-v1.pt"))
    assert judged.report.passed, judged.report.reason
    assert isinstance(judged.module, torch._dynamo.eval_frame.OptimizedModule)
    assert "so this process compiles (serving slows meanwhile): BuildFailed: the ahead-of-time" in caplog.text

    with torch._dynamo.config.patch(error_on_recompile=True):
        for size in (4, 3, 1, 2):
            batch = stack_images([torch.rand(3, 32, 32) for _ in range(size)])
            assert forward(judged, batch).shape == (size, 3)


@pytest.mark.torch_compile
@pytest.mark.parametrize("form", ["autocast", "weights"])
def test_under_compile_each_bf16_form_is_compiled_ahead_of_time_and_answers_like_its_eager_self(form, serving):
    from tinynet import colour_net, colour_state_dict

    from reloader.precision import build

    fp32 = colour_net()
    fp32.load_state_dict(colour_state_dict())
    fp32.eval().requires_grad_(False)
    calibration = torch.randn(4, 3, 32, 32)

    compiled = build(fp32, "bf16", form, "cpu", calibration, compile_side=32)
    eager = build(fp32, "bf16", form, "cpu", calibration)

    assert isinstance(compiled, Packaged) and not isinstance(eager, Packaged)
    assert compiled._orig_mod is not eager and type(compiled._orig_mod) is type(eager)  # the form, not fp32
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
    from reloader.optimize import compile_in_process

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
        compiled = compile_in_process(candidate, 32, 4)
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


@pytest.mark.torch_compile
def test_a_module_torch_export_refuses_is_compiled_in_the_server_s_process_and_says_why(serving, caplog):
    from tinynet import BranchingNet, colour_state_dict

    from reloader.optimize import compile_module

    module = BranchingNet().eval().requires_grad_(False)
    module.load_state_dict(colour_state_dict())

    compiled = compile_module(module, 32, 4)

    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    warning = next(r for r in caplog.records if "so this process compiles" in r.getMessage())
    assert "BuildFailed: the ahead-of-time compile failed (exit code 1): " in warning.getMessage()
    torch.manual_seed(2)
    for size in (1, 4):
        batch = torch.rand(size, 3, 32, 32)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(batch), module(batch))


@pytest.mark.torch_compile
def test_a_definition_compiled_in_the_server_s_process_compiles_there_again_and_others_in_a_child(monkeypatch):
    """Before the server serves, nothing is slowed down by a compile in its process; afterwards, one whose
    definition it compiled before reuses that code (resnet18's next checkpoint: 0.3 s, against 36 s cold)."""
    from tinynet import colour_net, colour_state_dict

    from reloader.optimize import compile_module

    monkeypatch.setattr(optimize, "SERVING", threading.Event())
    monkeypatch.setattr(optimize, "_compiled_here", set())
    children: list[tuple[int, ...]] = []

    def child(module: torch.nn.Module, images: torch.Tensor, max_batch: int) -> torch.nn.Module:
        children.append((*images.shape[1:], max_batch))  # the child process's part is tested above
        return module

    monkeypatch.setattr(packages, "compiled", child)

    def net(scale: float, num_classes: int = 3) -> torch.nn.Module:
        module = colour_net(num_classes).eval().requires_grad_(False)
        module.load_state_dict(colour_state_dict(num_classes, scale=scale))
        return module

    in_process = torch._dynamo.eval_frame.OptimizedModule
    assert isinstance(compile_module(net(1.0), 32, 4), in_process)  # the initial load
    optimize.SERVING.set()
    assert isinstance(compile_module(net(2.0), 32, 4), in_process) and children == []  # new weights
    assert not isinstance(compile_module(net(2.0), 32, 8), in_process)  # another max_size
    assert not isinstance(compile_module(net(2.0), 24, 4), in_process)  # another crop
    assert not isinstance(compile_module(net(2.0, num_classes=5), 32, 4), in_process)  # other shapes
    assert children == [(3, 32, 32, 8), (3, 24, 24, 4), (3, 32, 32, 4)]


@pytest.mark.torch_compile
def test_a_server_compiles_its_initial_load_itself_and_a_definition_edited_in_while_serving_in_a_child(
    project: Project, start_daemon
):
    live = project.save("colours-v1.pt")
    compiled = colours_yaml().replace("    version: latest\n", "    version: latest\n    optimize: compile\n")
    project.write_config(compiled)
    daemon = start_daemon(project.config)
    daemon.wait_live(live)
    assert "compiled ahead of time by a child process" not in daemon.log()  # nothing served yet: compiled here

    # Another batch.max_size: another definition, whose graphs this process has not compiled.
    project.write_config(compiled.replace("optimize: compile\n", "optimize: compile\n    batch: {max_size: 4}\n"))
    # Minutes at most, on two cores shared with another test: a child process imports torch, then compiles.
    child = "ColourNet compiled ahead of time by a child process in"
    wait_until(lambda: child in daemon.log(), timeout=300, what="the child's compile")
    wait_until(lambda: (s := daemon.status())["definition_current"] and not s["reloading"], what="the swap")
    assert daemon.status()["live"]["sha256"] == sha256(live)
    assert "so this process compiles" not in daemon.log()
    assert daemon.predict("blue").json()["predictions"][0]["label"] == "blue"
