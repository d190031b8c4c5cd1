"""The speedups that change no answer: BatchNorms folded into the convolutions before them, channels_last."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from conftest import Project, colours_yaml
from torch import nn

from reloader.architectures import build_model
from reloader.compute import FORWARD_LOCK, TRACE_LOCK
from reloader.config import load_config
from reloader.gate import Gate
from reloader.optimize import fold_batchnorms, prepare_module


def _with_trained_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random init leaves every BatchNorm an identity (mean 0, var 1, weight 1, bias 0); a trained one is not."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval().requires_grad_(False)


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _answers(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def test_every_batchnorm_after_a_convolution_is_folded_and_the_answers_stay_the_same():
    model = _with_trained_statistics(torchvision.models.mobilenet_v3_small(num_classes=10))
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    before, count = _answers(model, x), _batchnorms(model)

    folded = fold_batchnorms(model, "mobilenet_v3_small")

    assert count == 34 and _batchnorms(folded) == 0
    assert isinstance(folded, torchvision.models.MobileNetV3)  # folded in place: the same class, no graph copy
    torch.testing.assert_close(_answers(folded, x), before, rtol=1e-5, atol=1e-5)


def test_a_batchnorm_before_its_convolution_is_left_alone():
    # densenet normalises each block's input (BatchNorm -> ReLU -> conv): only the pairs conv -> BatchNorm fold.
    model = _with_trained_statistics(torchvision.models.densenet121(num_classes=10))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    before, count = _answers(model, x), _batchnorms(model)

    folded = fold_batchnorms(model, "densenet121")

    assert 0 < _batchnorms(folded) < count
    torch.testing.assert_close(_answers(folded, x), before, rtol=1e-4, atol=1e-5)


class _SharedNorm(nn.Module):
    """One BatchNorm after two convolutions: folding it into either would be wrong for the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 4, 3)
        self.head_norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.a(x)) + self.norm(self.b(x))
        return self.head_norm(self.head(y))


class _ConvNorm(nn.Module):
    """conv -> BatchNorm, a pair that folds; each case below adds one thing that must stop it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class _TiedWeights(_ConvNorm):
    """A second conv sharing the first one's weight, each with its own BatchNorm."""

    def __init__(self, *, same_parameter: bool) -> None:
        super().__init__()
        self.other = nn.Conv2d(3, 3, 3, padding=1)
        # Through a checkpoint, tied weights come back as two Parameters over one storage.
        self.other.weight = self.conv.weight if same_parameter else nn.Parameter(self.conv.weight.data)
        self.other_norm = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other_norm(self.other(super().forward(x)))


class _ReusesWeight(_ConvNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + nn.functional.conv2d(x, self.conv.weight, padding=1)


class _ReadsStatistics(_ConvNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) - self.norm.running_mean.view(1, -1, 1, 1)


class _AliasedNorm(_ConvNorm):
    """The BatchNorm is registered twice, and the forward calls it by its second name, `head[0]`."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(self.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


def _hooked() -> nn.Module:
    model = _ConvNorm()
    model.conv.register_forward_hook(lambda module, args, out: out.clamp(min=0))
    return model


def _weight_normed() -> nn.Module:
    model = _ConvNorm()
    nn.utils.parametrizations.weight_norm(model.conv)
    return model


class _Branchy(nn.Module):
    """Control flow on a value, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        return y if y.sum() > 0 else -y


def test_a_batchnorm_called_twice_stays_and_the_one_called_once_folds():
    model = _with_trained_statistics(_SharedNorm())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    before = _answers(model, x)

    folded = fold_batchnorms(model, "shared")

    assert isinstance(folded.norm, nn.BatchNorm2d) and isinstance(folded.head_norm, nn.Identity)
    torch.testing.assert_close(_answers(folded, x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build",
    [
        lambda: _TiedWeights(same_parameter=True),
        lambda: _TiedWeights(same_parameter=False),
        _ReusesWeight,
        _ReadsStatistics,
        _AliasedNorm,
        _hooked,
        _weight_normed,
    ],
    ids=["tied-parameter", "tied-storage", "weight-read", "statistics-read", "aliased", "hooked", "weight-norm"],
)
def test_a_pair_whose_folding_would_change_the_answers_is_left_alone(build):
    model = _with_trained_statistics(build())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    before = _answers(model, x)

    folded = fold_batchnorms(model, "edge")

    assert isinstance(folded.norm, nn.BatchNorm2d)
    torch.testing.assert_close(_answers(folded, x), before)


def test_a_module_torch_fx_cannot_trace_serves_unfolded_and_the_log_says_why(caplog: pytest.LogCaptureFixture):
    model = _with_trained_statistics(_Branchy())
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    before = _answers(model, x)

    with caplog.at_level(logging.INFO, logger="reloader.optimize"):
        folded = fold_batchnorms(model, "branchy")

    assert folded is model and isinstance(folded.norm, nn.BatchNorm2d)
    torch.testing.assert_close(_answers(folded, x), before)
    assert "branchy: BatchNorms not folded, torch.fx cannot trace it: TraceError" in caplog.text


def test_the_gate_serves_the_folded_channels_last_module_and_checks_finiteness_on_the_checkpoints_tensors(
    project: Project,
):
    model = _with_trained_statistics(torchvision.models.resnet18(num_classes=3))
    project.write_config(colours_yaml(expect=False).replace("arch: tinynet:colour_net", "arch: resnet18"))
    config = load_config(project.config).models["colours"]
    good = project.save("colours-v1.pt", model.state_dict())
    bad_state = {k: v.clone() for k, v in model.state_dict().items()}
    bad_state["layer1.0.bn1.running_var"][0] = float("nan")
    bad = project.save("colours-v2.pt", bad_state)

    live = Gate("colours", config, prepare_module).judge(good)
    rejected = Gate("colours", config, prepare_module).judge(bad).report

    assert live.module is not None, live.report.reason
    assert _batchnorms(live.module) == 0
    assert live.module.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_answers(live.module, x), _answers(model, x), rtol=1e-4, atol=1e-4)
    # Checked before folding, the NaN is reported where the checkpoint has it, not in a folded conv.
    assert rejected.reason == "finite: non-finite (NaN/inf) values in layer1.0.bn1.running_var (1 of 64 values)"


class _SeesTheLock(nn.Module):
    """Records, when torch.fx runs its forward to trace it, whether forward passes are held off meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.traced_under_lock: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.traced_under_lock.append(FORWARD_LOCK.locked() and TRACE_LOCK.locked())
        return self.norm(self.conv(x))


BUILT_UNDER_LOCK: list[bool] = []


def sized_by_a_forward(num_classes: int = 3) -> nn.Module:
    """A factory in the common style that runs its layers once to size the head, as an arch for build_model."""
    BUILT_UNDER_LOCK.append(TRACE_LOCK.locked())
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    width = features(torch.zeros(1, 3, 8, 8)).shape[1]
    return nn.Sequential(features, nn.Linear(width, num_classes))


def test_tracing_takes_turns_with_forward_passes_because_fx_patches_every_threads_module_calls():
    # While fx traces, nn.Module.__call__ is patched process-wide: a serving forward that ran meanwhile
    # failed with "NameError: module is not installed as a submodule" (seen under load in the bench).
    model = _with_trained_statistics(_SeesTheLock())

    folded = fold_batchnorms(model, "sees-the-lock")

    assert model.traced_under_lock == [True]
    assert isinstance(folded.norm, nn.Identity)
    assert not FORWARD_LOCK.locked()


def test_a_factory_builds_in_turn_with_tracing_since_it_may_call_its_own_modules():
    state = {k: torch.ones_like(v) for k, v in sized_by_a_forward().state_dict().items()}
    BUILT_UNDER_LOCK.clear()

    model = build_model("test_optimize:sized_by_a_forward", 3, state)

    assert BUILT_UNDER_LOCK == [True]
    assert not TRACE_LOCK.locked()
    assert isinstance(model, nn.Sequential)
