"""Precision and device per model: offered only where the hardware runs them, proven against fp32 by the gate."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import DEADLINE, Project, colours_yaml, png_bytes, sha256, wait_until
from PIL import Image
from tinynet import COLOURS, colour_net, colour_state_dict

from reloader.config import ModelConfig, load_config
from reloader.errors import ConfigError
from reloader.gate import Gate
from reloader.hardware import Hardware
from reloader.optimize import prepare_module
from reloader.precision import AUTO_MIN_SPEEDUP, build, half_copy, pick
from reloader.report import VariantResult

EPYC = Hardware("AMD EPYC 7B13", frozenset({"avx2", "fma"}), 0)
# A CPU with native bf16. On a machine without it the bf16 forms still run, only slowly: fine for a tiny net.
XEON = Hardware("Intel Xeon (AMX)", frozenset({"avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "amx_int8"}), 0)
# bf16 but no VNNI: int8 is not offered (a made-up CPU, to take int8 out of a test about bf16).
BF16_ONLY = Hardware("bf16-only CPU", frozenset({"avx512_bf16"}), 0)


def configure(project: Project, precision: str, *, expect: bool = True, extra: str = "") -> ModelConfig:
    text = colours_yaml(expect=expect).replace(
        "    version: latest\n", f"    version: latest\n    precision: {precision}\n"
    )
    project.write_config(text.replace("    preprocess:", f"{extra}    preprocess:"))
    return load_config(project.config).models["colours"]


def near_tie_state_dict() -> dict:
    """fp32 tells red from 'green' on a red image by 0.001 of a weight; bf16 (8 bits of mantissa) cannot."""
    state = colour_state_dict()
    state["fc.weight"] = torch.tensor([[4.0, 0.0, 0.0], [4.001, 0.0, 0.0], [0.0, 0.0, 4.0]])
    return state


def test_int8_is_offered_only_on_a_cpu_with_vnni_and_never_on_cuda():
    assert XEON.why_not("int8", "cpu") is None
    assert Hardware("Xeon", frozenset({"avx_vnni"}), 0).why_not("int8", "cpu") is None
    why = EPYC.why_not("int8", "cpu")
    assert why is not None and "VNNI or AMX-INT8" in why and "AMD EPYC 7B13" in why
    assert "not for CUDA" in XEON.why_not("int8", "cuda")


def test_int8_is_calibrated_on_the_golden_images_and_proven_like_bf16(project: Project):
    checkpoint = project.save("colours-v1.pt")
    judged = Gate("colours", configure(project, "int8"), prepare_module, XEON).judge(checkpoint)
    report = judged.report

    assert report.passed, report.reason
    assert (report.precision, report.form) == ("int8", "static")
    (int8,) = report.variants
    assert int8.passed and int8.agreement == 1.0 and int8.max_prob_delta <= 0.02 and int8.img_s > 0
    rows = torch.stack([judged.preprocessor.load(png_bytes(c)) for c in COLOURS])
    with torch.inference_mode():
        answers = judged.module(rows.contiguous(memory_format=torch.channels_last))
    assert answers.dtype == torch.float32
    assert [COLOURS[i] for i in answers.argmax(dim=1)] == list(COLOURS)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in judged.module.modules())


def test_device_auto_takes_the_cpu_for_a_precision_the_gpu_does_not_run(project: Project):
    """int8 on a GPU host, bf16 on a pre-Ampere one: a config that runs on a CPU host did not run there."""
    volta_on_a_xeon = Hardware(XEON.cpu_model, XEON.cpu_flags, 1, ((7, 0),))
    for precision, device in (("int8", "cpu"), ("bf16", "cpu"), ("fp16", "cuda"), ("fp32", "cuda")):
        config = configure(project, precision).model_copy(update={"device": "auto"})
        assert Gate("colours", config, prepare_module, volta_on_a_xeon).device == device, precision
    on_the_gpu = configure(project, "bf16").model_copy(update={"device": "cuda"})
    with pytest.raises(ConfigError, match=r"^models\.colours\.precision: cuda \(compute capability 7\.0\) has no"):
        Gate("colours", on_the_gpu, prepare_module, volta_on_a_xeon)


def test_bf16_is_offered_only_on_a_cpu_with_native_bf16():
    assert XEON.why_not("bf16", "cpu") is None
    assert Hardware("Xeon", frozenset({"avx512_bf16"}), 0).why_not("bf16", "cpu") is None
    why = EPYC.why_not("bf16", "cpu")
    assert why is not None and "AMX-BF16 or AVX512-BF16" in why and "AMD EPYC 7B13" in why and "slower" in why
    assert EPYC.why_not("fp32", "cpu") is None


def test_fp16_is_offered_on_cuda_from_volta_on_and_never_on_a_cpu():
    gpus = Hardware("x", frozenset(), 3, ((8, 0), (7, 0), (6, 1)))
    assert gpus.why_not("fp16", "cuda") is None and gpus.why_not("fp16", "cuda:1") is None
    assert gpus.why_not("fp16", "cuda:2") == "cuda:2 (compute capability 6.1) has no fp16 tensor cores"
    assert gpus.why_not("bf16", "cuda:0") is None
    assert gpus.why_not("bf16", "cuda:1") == "cuda:1 (compute capability 7.0) has no native bf16"
    for cpu in (XEON, EPYC):
        assert cpu.why_not("fp16", "cpu") == (
            "fp16 is offered on CUDA only: on a CPU, bf16 is the half precision with native instructions"
        )


def test_an_explicit_fp16_on_a_cpu_is_refused_with_the_reason(project: Project):
    with pytest.raises(ConfigError, match=r"models\.colours\.precision: fp16 is offered on CUDA only"):
        Gate("colours", configure(project, "fp16"), prepare_module, XEON)


@pytest.mark.parametrize("form", ["autocast", "weights"])
def test_each_fp16_form_answers_fp32_scores_with_fp32s_top1(form):
    """The forms CUDA serves, run here on the CPU (which supports fp16, only slowly): the wrappers, not the kernels."""
    fp32 = colour_net()
    fp32.load_state_dict(colour_state_dict())
    fp32.eval().requires_grad_(False)
    rows = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    rows[torch.arange(6), torch.arange(6) % 3] += 1.0  # channel i % 3 dominates row i
    module = build(fp32, "fp16", form, "cpu", rows)
    computed: list[torch.dtype] = []
    with torch.inference_mode():
        reference = fp32(rows)
        module.inner.fc.register_forward_hook(lambda m, args, out: computed.append(out.dtype))
        answers = module(rows)
    assert computed == [torch.float16] and answers.dtype == torch.float32
    assert answers.argmax(dim=1).tolist() == reference.argmax(dim=1).tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(answers.softmax(1), reference.softmax(1), atol=0.01, rtol=0)
    assert {t.dtype for t in module.inner.parameters()} == {torch.float16 if form == "weights" else torch.float32}


def test_device_auto_is_the_cpu_without_cuda_and_a_missing_cuda_device_says_what_there_is():
    assert EPYC.device("auto") == "cpu"
    assert Hardware("x", frozenset(), 2).device("auto") == "cuda"
    with pytest.raises(ValueError, match="no CUDA device"):
        EPYC.device("cuda")
    with pytest.raises(ValueError, match=re.escape("'cuda:1': this machine has 1 CUDA device(s)")):
        Hardware("x", frozenset(), 1).device("cuda:1")


def test_an_explicit_bf16_on_a_cpu_without_it_is_refused_with_the_reason(project: Project):
    config = configure(project, "bf16")
    with pytest.raises(ConfigError, match=r"models\.colours\.precision: bf16 needs a CPU with AMX-BF16"):
        Gate("colours", config, prepare_module, EPYC)
    # auto is never refused: it takes bf16 only where it runs.
    assert Gate("colours", configure(project, "auto"), prepare_module, EPYC).device == "cpu"


def test_a_cuda_device_on_a_machine_without_one_is_a_config_error(project: Project):
    config = configure(project, "fp32", extra="    device: cuda\n")
    with pytest.raises(ConfigError, match=r"models\.colours\.device: device 'cuda': this machine has no CUDA device"):
        Gate("colours", config, prepare_module, EPYC)


def test_bf16_passes_the_fidelity_check_and_serves_its_faster_form(project: Project):
    checkpoint = project.save("colours-v1.pt")
    judged = Gate("colours", configure(project, "bf16"), prepare_module, XEON).judge(checkpoint)
    report = judged.report

    assert report.passed, report.reason
    assert [c.name for c in report.checks] == ["load", "structure", "finite", "warmup", "fidelity"]
    assert (report.precision, report.device) == ("bf16", "cpu")
    forms = {v.form: v for v in report.variants}
    assert set(forms) == {"autocast", "weights"}
    for v in forms.values():
        assert v.passed and v.agreement == 1.0 and 0 <= v.max_prob_delta <= 0.02 and v.img_s > 0, v
    faster = max(forms.values(), key=lambda v: v.img_s)
    assert report.form == faster.form
    assert f"bf16 ({faster.form}) serves" in report.checks[-1].detail
    # The module that serves answers every golden image as fp32 does.
    rows = torch.stack([judged.preprocessor.load(png_bytes(c)) for c in COLOURS])
    with torch.inference_mode():
        answers = judged.module(rows.contiguous(memory_format=torch.channels_last))
    assert answers.dtype == torch.float32
    assert [COLOURS[i] for i in answers.argmax(dim=1)] == list(COLOURS)


def test_a_form_that_changes_a_golden_top1_is_rejected_with_the_numbers(project: Project):
    checkpoint = project.save("colours-v1.pt", near_tie_state_dict())
    report = Gate("colours", configure(project, "bf16", expect=False), prepare_module, XEON).judge(checkpoint).report

    assert not report.passed
    assert report.reason.startswith("fidelity: bf16 (autocast): red.png changed its top-1; agreement 0.667 < 0.99")
    assert "bf16 (weights): red.png changed its top-1" in report.reason


def test_auto_keeps_fp32_when_no_faster_form_keeps_the_answers(project: Project):
    checkpoint = project.save("colours-v1.pt", near_tie_state_dict())
    judged = Gate("colours", configure(project, "auto", expect=False), prepare_module, BF16_ONLY).judge(checkpoint)

    assert judged.report.passed and judged.report.precision == "fp32"
    assert [(v.precision, v.form, v.passed) for v in judged.report.variants] == [
        ("bf16", "autocast", False),
        ("bf16", "weights", False),
        ("int8", "-", False),
    ]
    assert judged.report.variants[-1].detail.startswith("skipped: int8 needs a CPU with VNNI")


def test_auto_does_not_take_int8_which_the_golden_images_calibrate_and_so_cannot_prove(project: Project):
    report = (
        Gate("colours", configure(project, "auto"), prepare_module, XEON).judge(project.save("colours-v1.pt")).report
    )

    assert report.passed and report.precision != "int8"
    (int8,) = [v for v in report.variants if v.precision == "int8"]
    assert not int8.passed and int8.detail.startswith("skipped: auto does not take int8 without at least 32 held-out")


def test_with_an_evaluation_set_int8_is_calibrated_on_one_half_and_proven_on_the_other(project: Project):
    """Then auto may take int8: what proves it was never seen by its calibration."""
    for channel, colour in enumerate(COLOURS):
        (project.root / "eval" / colour).mkdir(parents=True)
        for i in range(22):  # 66 images: every other one of them held out, 33 of them
            rgb = [100 + i, 110 + 2 * i, 105]
            rgb[channel] = 170 + 3 * i
            Image.new("RGB", (40, 40), tuple(rgb)).save(project.root / "eval" / colour / f"{i:02}.png")
    config = configure(project, "auto", extra="    evaluation: {images: eval}\n")
    gate = Gate("colours", config, prepare_module, XEON)

    evidence = gate._evidence()
    assert (evidence.golden, evidence.held_out, len(evidence.calibration)) == (3, 33, 36)
    proving = {tuple(t.flatten()[:3].tolist()) for t in evidence.images[evidence.golden :]}
    calibrating = {tuple(t.flatten()[:3].tolist()) for t in evidence.calibration[evidence.golden :]}
    assert not proving & calibrating
    assert {source.split("/")[0] for source in evidence.sources[evidence.golden :]} == set(COLOURS)

    report = gate.judge(project.save("colours-v1.pt")).report
    (int8,) = [v for v in report.variants if v.precision == "int8"]
    assert not int8.detail.startswith("skipped"), int8.detail
    assert int8.agreement is not None and int8.max_prob_delta is not None


def test_auto_on_a_cpu_without_bf16_skips_it_and_says_why(project: Project):
    checkpoint = project.save("colours-v1.pt")
    report = Gate("colours", configure(project, "auto"), prepare_module, EPYC).judge(checkpoint).report

    assert report.passed and report.precision == "fp32"
    bf16, int8 = report.variants
    assert not bf16.passed and bf16.detail.startswith("skipped: bf16 needs a CPU with AMX-BF16")
    assert not int8.passed and int8.detail.startswith("skipped: int8 needs a CPU with VNNI or AMX-INT8")


def kept(form: str, img_s: float) -> VariantResult:
    return VariantResult("bf16", form, "cpu", True, "kept", 1.0, 0.001, img_s)


@pytest.mark.parametrize(
    ("fp32", "forms", "auto", "serves"),
    [
        (100.0, [kept("autocast", 250.0), kept("weights", 300.0)], True, "weights"),
        (100.0, [kept("autocast", 300.0), kept("weights", 250.0)], True, "autocast"),
        (100.0, [kept("autocast", 100.0 * AUTO_MIN_SPEEDUP)], True, "autocast"),
        (100.0, [kept("autocast", 105.0)], True, None),  # not worth it: fp32 serves
        (100.0, [], True, None),
        (None, [kept("autocast", 50.0), kept("weights", 40.0)], False, "autocast"),  # explicit: its fastest form
    ],
)
def test_the_fastest_kept_form_serves_and_auto_asks_for_a_margin_over_fp32(fp32, forms, auto, serves):
    chosen = pick(fp32, forms, auto)
    assert (chosen.form if chosen else None) == serves


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_copy_leaves_the_fp32_module_as_it_was(dtype):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    half = half_copy(module, dtype)
    assert all(t.dtype == torch.float32 for t in module.state_dict().values() if t.is_floating_point())
    assert all(t.dtype == dtype for t in half.state_dict().values() if t.is_floating_point())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert half[1].num_batches_tracked is not module[1].num_batches_tracked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a CUDA device")
def test_on_cuda_the_weights_move_to_the_device_and_the_answers_match_the_cpu(project: Project):
    checkpoint = project.save("colours-v1.pt")
    cpu = Gate("colours", configure(project, "fp32", extra="    device: cpu\n"), prepare_module).judge(checkpoint)
    cuda = Gate("colours", configure(project, "auto", extra="    device: cuda\n"), prepare_module).judge(checkpoint)
    assert cuda.report.passed, cuda.report.reason
    assert cuda.report.device == "cuda"
    assert all(p.device.type == "cuda" for p in cuda.module.parameters())
    rows = torch.stack([cpu.preprocessor.load(png_bytes(c)) for c in COLOURS])
    with torch.inference_mode():
        torch.testing.assert_close(cuda.module(rows).softmax(1), cpu.module(rows).softmax(1), atol=0.02, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a CUDA device")
def test_on_cuda_fp16_is_proven_like_bf16_and_auto_tries_it(project: Project):
    if torch.cuda.get_device_capability(0) < (7, 0):
        pytest.skip("fp16 is offered from compute capability 7.0 on; this GPU is older")
    checkpoint = project.save("colours-v1.pt")
    cpu = Gate("colours", configure(project, "fp32"), prepare_module).judge(checkpoint)
    fp16 = Gate("colours", configure(project, "fp16", extra="    device: cuda\n"), prepare_module).judge(checkpoint)
    assert fp16.report.passed, fp16.report.reason
    assert (fp16.report.precision, fp16.report.device) == ("fp16", "cuda")
    assert {v.form for v in fp16.report.variants} == {"autocast", "weights"}
    rows = torch.stack([cpu.preprocessor.load(png_bytes(c)) for c in COLOURS])
    with torch.inference_mode():
        torch.testing.assert_close(fp16.module(rows).softmax(1), cpu.module(rows).softmax(1), atol=0.02, rtol=0)
    auto = Gate("colours", configure(project, "auto", extra="    device: cuda\n"), prepare_module).judge(checkpoint)
    assert {("fp16", "autocast"), ("fp16", "weights")} <= {(v.precision, v.form) for v in auto.report.variants}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a CUDA device")
def test_on_cuda_a_dropped_version_gives_its_gpu_memory_back_at_release(project: Project):
    from reloader.memory import release

    gate = Gate("colours", configure(project, "fp32", extra="    device: cuda\n"), prepare_module)
    held, after = [], []
    for i in range(3):  # the first round also leaves what CUDA keeps for good (cuBLAS's workspace, say)
        judged = gate.judge(project.save(f"colours-v{i + 1}.pt"))
        assert judged.report.passed, judged.report.reason
        held.append(torch.cuda.memory_reserved())
        del judged
        release()  # what a swap calls once the old version is dropped
        after.append(torch.cuda.memory_reserved())
    assert after[1] == after[2] < held[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a CUDA device")
def test_on_cuda_the_daemon_serves_from_the_gpu_and_swaps_in_a_new_version(project: Project, start_daemon):
    configure(project, "auto", extra="    device: cuda\n")
    first = project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    live = daemon.wait_live(first)["live"]
    assert (live["device"], live["report"]["device"]) == ("cuda", "cuda")
    assert [daemon.predict(c).json()["predictions"][0]["label"] for c in COLOURS] == list(COLOURS)
    sharper = project.save("colours-v2.pt", colour_state_dict(scale=6.0))
    assert daemon.wait_live(sharper)["live"]["device"] == "cuda"
    for colour in COLOURS:  # answered by the new version
        response = daemon.predict(colour)
        assert response.headers["X-Model-Sha256"] == sha256(sharper)
        assert response.json()["predictions"][0]["label"] == colour


def test_the_daemon_shows_what_precision_serves_in_the_status_and_the_metrics(project: Project, start_daemon):
    from test_metrics import Scrape

    configure(project, "auto")
    checkpoint = project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    live = daemon.wait_live(checkpoint)["live"]

    report = live["report"]
    assert (live["precision"], live["device"]) == (report["precision"], report["device"])
    assert live["device"] == "cpu"  # the default: a GPU is opted into
    assert live["precision"] in ("fp32", "bf16")
    assert [c["name"] for c in report["checks"]][-1] == "fidelity"
    assert {v["precision"] for v in report["variants"]} >= {"bf16"}
    (labels,) = Scrape(daemon).labels("reloader_live_model_info")
    assert (labels["precision"], labels["device"], labels["version"]) == (live["precision"], live["device"], "1")
    assert daemon.predict("blue").json()["predictions"][0]["label"] == "blue"


def test_speeds_are_measured_once_per_model_definition_not_for_every_file(project: Project):
    gate = Gate("colours", configure(project, "auto"), prepare_module, XEON)
    first = gate.judge(project.save("colours-v1.pt")).report
    second = gate.judge(project.save("colours-v2.pt", colour_state_dict(scale=5.0))).report

    assert first.passed and second.passed and first.sha256 != second.sha256
    speeds = [{(v.precision, v.form): v.img_s for v in r.variants if v.passed} for r in (first, second)]
    assert speeds[0] == speeds[1] and all(s > 0 for s in speeds[0].values())
    assert set(speeds[0]) == {("fp32", "eager"), ("bf16", "autocast"), ("bf16", "weights")}


def test_once_a_bf16_weights_form_serves_the_fp32_module_is_freed(project: Project, monkeypatch):
    import gc
    import weakref

    from reloader import precision

    monkeypatch.setattr(precision, "FORMS", {"bf16": ("weights",)})
    prepared: list[weakref.ref] = []

    def prepare(module, config):
        module = prepare_module(module, config)
        prepared.append(weakref.ref(module))
        return module

    judged = Gate("colours", configure(project, "bf16"), prepare, XEON).judge(project.save("colours-v1.pt"))
    gc.collect()
    assert judged.report.passed and judged.report.form == "weights"
    assert prepared and prepared[0]() is None, "the fp32 module outlived the check"
    assert all(p.dtype == torch.bfloat16 for p in judged.module.parameters())


def test_an_int8_form_and_what_built_it_are_freed_once_dropped(project: Project):
    """torch's FX quantization caches every module it sees: without clearing that, each reload kept one."""
    import gc
    import weakref

    from reloader.int8 import fx_int8

    net = colour_net().eval()
    net.load_state_dict(colour_state_dict())
    fp32 = prepare_module(net, configure(project, "fp32"))
    calibration = (torch.eye(3) * 0.8 + 0.1)[:, :, None, None].expand(3, 3, 8, 8)  # red, green, blue
    int8 = fx_int8(fp32, calibration, 2)  # calibrated in batches of 2
    assert not any("qconfig" in vars(m) for m in fp32.modules())  # FX gives them one while it works
    shared = {id(m) for m in fp32.modules()}  # the layers FX left in fp32 are fp32's own
    refs = [weakref.ref(m) for m in (int8, *int8.modules()) if id(m) not in shared]
    assert len(refs) > 2
    assert int8(calibration).argmax(1).tolist() == [0, 1, 2]
    del int8
    gc.collect()
    assert [r() for r in refs if r() is not None] == []


class SmallBatchesOnly(torch.nn.Module):
    """`inner`, failing as a machine short of memory does on batches of more than 3."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > 3:
            raise RuntimeError("out of memory")
        return self.inner(x)


def test_a_form_that_fails_at_the_full_batch_is_not_offered_and_auto_serves_fp32(project: Project, monkeypatch):
    from reloader import precision

    real_build = precision.build
    monkeypatch.setattr(precision, "build", lambda *args: SmallBatchesOnly(real_build(*args)))
    report = (
        Gate("colours", configure(project, "auto"), prepare_module, XEON).judge(project.save("colours-v1.pt")).report
    )

    assert report.passed and report.precision == "fp32"
    failed = [v for v in report.variants if v.precision == "bf16"]
    assert failed and all(not v.passed and v.detail.startswith("failed at batch 8: RuntimeError") for v in failed)


def test_a_form_built_while_the_disk_is_full_leaves_the_file_to_be_judged_again_not_rejected(
    project: Project, monkeypatch
):
    """Not "failed" (fp32 serving under auto, the file rejected under bf16): the machine, not the form."""
    import errno

    from reloader import precision

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(precision, "build", disk_full)
    for asked in ("auto", "bf16"):
        gate = Gate("colours", configure(project, asked), prepare_module, XEON)
        report = gate.judge(project.save("colours-v1.pt")).report
        assert not report.passed and report.short, asked
        assert report.reason.startswith("fidelity: OSError: [Errno 28] No space left on device (this machine was short")


def test_under_auto_an_fp32_module_that_fails_at_the_full_batch_is_rejected_not_served(project: Project):
    """It used to serve, its failure left out of the report, and every full batch served then failed."""

    def prepare(module: torch.nn.Module, config) -> torch.nn.Module:
        return SmallBatchesOnly(prepare_module(module, config))

    judged = Gate("colours", configure(project, "auto"), prepare, XEON).judge(project.save("colours-v1.pt"))

    assert not judged.passed
    assert judged.report.reason == "fidelity: fp32 failed at batch 8: RuntimeError: out of memory (batch.max_size)"


def test_an_explicit_bf16_rejected_by_fidelity_keeps_each_forms_numbers_in_the_report(project: Project):
    checkpoint = project.save("colours-v1.pt", near_tie_state_dict())
    report = Gate("colours", configure(project, "bf16", expect=False), prepare_module, XEON).judge(checkpoint).report

    assert not report.passed
    assert [(v.form, v.passed, v.agreement) for v in report.variants] == [
        ("autocast", False, pytest.approx(2 / 3)),
        ("weights", False, pytest.approx(2 / 3)),
    ]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("device: gpu", "models.colours.device: string should match pattern"),
        ("device: 'cuda:'", "models.colours.device: string should match pattern"),
        ("device: 'cuda:01'", "models.colours.device: string should match pattern"),  # torch.device refuses it
        ("precision: int4", "models.colours.precision: input should be 'fp32', 'bf16', 'fp16', 'int8' or 'auto'"),
        ("fidelity: {min_agreement: 1.5}", "models.colours.fidelity.min_agreement: must be <= 1"),
        ("fidelity: {max_prob_delta: -0.1}", "models.colours.fidelity.max_prob_delta: must be >= 0"),
    ],
)
def test_precision_device_and_fidelity_outside_their_ranges_are_config_errors(project: Project, line, error):
    project.write_config(colours_yaml().replace("    preprocess:", f"    {line}\n    preprocess:"))
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_config(project.config)


@pytest.mark.torch_compile
def test_under_compile_int8_is_also_built_by_pt2e_in_a_child_process_and_proven_beside_fx(project: Project):
    import multiprocessing

    from reloader.packages import Packaged

    # Batches of 2 at most: the 3 golden images that calibrate it are more than a batch.
    config = configure(project, "int8", extra="    batch: {max_size: 2}\n").model_copy(update={"optimize": "compile"})
    before = set(multiprocessing.active_children())
    judged = Gate("colours", config, prepare_module, XEON).judge(project.save("colours-v1.pt"))

    report = judged.report
    assert report.passed, report.reason
    rows = {v.form: v for v in report.variants}
    assert set(rows) == {"static", "pt2e"}
    assert rows["pt2e"].passed and rows["pt2e"].agreement == 1.0 and rows["pt2e"].img_s > 0, rows["pt2e"].detail
    assert report.form == max(rows.values(), key=lambda v: v.img_s).form  # the faster serves
    assert set(multiprocessing.active_children()) == before  # the build's process is gone
    assert isinstance(judged.module, Packaged) == (report.form == "pt2e")
    images = torch.stack([judged.preprocessor.load(png_bytes(c)) for c in COLOURS])
    with torch.inference_mode():  # in batches of max_size, as served
        answers = torch.cat([judged.module(part) for part in images.split(2)])
    assert [COLOURS[i] for i in answers.argmax(dim=1)] == list(COLOURS)


def test_a_pt2e_form_with_a_max_pool_compiles_it_in_and_lets_go_of_the_gil(monkeypatch):
    """A resnet's stem (convolution, ReLU, max pool): on a CPU with VNNI, Inductor matched the int8 max pool to
    quantized::max_pool2d, which the library called through torch's proxy executor: a library run by ctypes
    has none, so every PT2E form of a resnet failed to run there; then ran through torch's loader, which held
    the GIL for the whole forward. The build now compiles the pool in (packages.inlined_quantized_max_pool)."""
    from reloader import libraries
    from reloader.int8 import pt2e_int8

    torch.manual_seed(0)
    stem = (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(3, 2, padding=1),
            torch.nn.Conv2d(8, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 4),
        )
        .eval()
        .requires_grad_(False)
    )
    stem[-1].weight.mul_(50.0)  # answers far apart, so that one that ignored its input could not pass
    images = torch.rand(8, 3, 32, 32) * torch.linspace(0.2, 2.0, 8).view(8, 1, 1, 1)
    found: list[list[str]] = []
    calls_out = libraries.calls_out
    monkeypatch.setattr(libraries, "calls_out", lambda library: found.append(calls_out(library)) or found[-1])
    form = pt2e_int8(stem, images, 4)
    with torch.inference_mode():
        answers = torch.cat([form(part) for part in images.split(4)]).softmax(1)
        reference = stem(images).softmax(1)
    assert (reference.max(0).values - reference.min(0).values).max() > 0.3  # the images are told apart
    assert answers.argmax(1).tolist() == reference.argmax(1).tolist()
    torch.testing.assert_close(answers, reference, atol=0.1, rtol=0)
    assert found == [[]]  # nothing called outside the library
    assert isinstance(form.runner, libraries.Container)  # so run through ctypes, the GIL let go


def test_the_ops_a_library_calls_outside_itself_are_read_from_the_list_beside_it(tmp_path):
    from reloader.libraries import calls_out

    library = tmp_path / "model.wrapper.so"
    assert calls_out(library) == []  # no list: every op is compiled in
    node = {"target": "quantized::max_pool2d", "inputs": [], "outputs": [], "name": "buf2"}  # as AOTInductor writes it
    library.with_suffix(".json").write_text(json.dumps({"nodes": [{"name": "buf2", "node": node}]}))
    assert calls_out(library) == ["quantized::max_pool2d"]


def test_a_pt2e_build_that_fails_in_its_process_says_why_in_the_error():
    """The gate then reports the form as failed and does not offer it (test_a_form_that_fails_...)."""
    from reloader.int8 import pt2e_int8

    net = colour_net().eval().requires_grad_(False)
    not_rgb = torch.rand(2, 5, 8, 8)  # the net's BatchNorm1d takes 3 channels
    with pytest.raises(RuntimeError, match=r"the PT2E int8 build failed \(exit code 1\): .*(3|5)"):
        pt2e_int8(net, not_rgb, 8)
    # Handed over in a file: as process arguments, its tensors would have moved into /dev/shm.
    assert not any(p.is_shared() for p in net.parameters())


def test_a_dropped_pt2e_package_is_unloaded_while_the_threads_that_ran_it_live_on(tmp_path):
    """A server's threads outlive its packages. AOTInductor's library stayed loaded until every thread that had
    called it ended, so each package a server dropped stayed mapped, its deleted file's space held with it."""
    import gc
    import threading

    from reloader.int8 import quantized
    from reloader.packages import loaded, package

    images = torch.rand(4, 3, 16, 16)
    path = package(colour_net().eval().requires_grad_(False), images, 4, tmp_path, quantized)

    def mapped() -> set[str]:
        with open("/proc/self/maps") as maps:
            return set(re.findall(r"/\S*reloader-package-\S*\.wrapper\.so", maps.read()))

    before, answers, dropped = mapped(), [], threading.Event()
    packages = [loaded(path, (3, 16, 16), 4) for _ in range(3)]  # each load extracts its own library
    libraries = mapped() - before

    def serve() -> None:  # as the inference thread does, which lives on
        with torch.inference_mode():
            answers.extend(package(images[:2]).argmax(dim=1).tolist() for package in packages)
        dropped.wait(DEADLINE)

    serving = threading.Thread(target=serve, name="serving")
    serving.start()
    wait_until(lambda: len(answers) == 3, what="each package to answer")
    packages.clear()
    gc.collect()
    left = mapped() - before
    dropped.set()
    serving.join()
    assert len(libraries) == 3
    for wrong in (torch.rand(2, 3, 8, 8), torch.rand(5, 3, 16, 16)):  # its kernels would read out of bounds
        with pytest.raises(ValueError, match=r"takes batches of 1 to 4 images of \(3, 16, 16\)"):
            loaded(path, (3, 16, 16), 4)(wrong)
    # The first package a process loads stays: glibc makes some of its symbols process-wide (packages.py).
    assert len(left) <= 1, f"{len(left)} of 3 dropped packages are still mapped"


def test_a_torch_whose_aoti_interface_differs_fails_the_pt2e_build_and_says_so(monkeypatch):
    from reloader import packages

    monkeypatch.setattr(packages, "PINNING_SLOT", "static thread_local std::string g_some_other_slot;")
    with pytest.raises(RuntimeError, match=r"interface\.cpp no longer declares .*g_some_other_slot"):
        packages.unpinned_interface()


def test_a_pt2e_build_past_its_time_is_stopped(monkeypatch):
    import multiprocessing

    from reloader import int8, packages

    monkeypatch.setattr(packages, "BUILD_TIMEOUT_S", 0.2)  # the child is still starting Python by then
    before = set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match=r"the PT2E int8 build took over 0 s"):
        int8.pt2e_int8(colour_net().eval(), torch.rand(2, 3, 8, 8), 8)
    assert set(multiprocessing.active_children()) == before
