"""deploy/: the Kubernetes manifests and the Dockerfile, checked against the daemon they run.

No cluster and no docker daemon here: the manifests are validated against the API schemas offline
(kubernetes-validate --strict), rendered the way kustomize would for what they use, and checked for
agreement with the daemon itself: its routes, its CLI, its config parser, the files the image holds.
"""

from __future__ import annotations

import asyncio
import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml

from reloader.app import Service, build_app
from reloader.cli import _parser
from reloader.config import ServerConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "deploy" / "kubernetes"  # the S3 variant: the default manifests
OVERLAY = ROOT / "deploy" / "kubernetes-shared-volume"  # the ReadWriteMany variant, an overlay of BASE
VARIANTS = {"s3": BASE, "shared-volume": OVERLAY}
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# The newest Kubernetes whose schemas kubernetes-validate 1.37.0 ships (its kubernetes-json-schema folder).
KUBERNETES_VERSION = "1.37.0"
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
TIMEOUT = 120


def manifests(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")


def one_object(path: Path) -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(documents) == 1, f"{path}: one Kubernetes object per file, found {len(documents)}"
    obj = documents[0]
    assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), path
    return obj


def kustomization(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


# -- rendering: what `kustomize build` does with the fields these kustomizations use --------------------

# Strategic merge patch keys of the lists the overlay patches (the API's x-kubernetes-patch-merge-key).
MERGE_KEYS = {
    "containers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
}
UNDERSTOOD = {"apiVersion", "kind", "resources", "patches", "images"}


def merge(base: Any, patch: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for k, v in patch.items():
            merged[k] = merge(base[k], v, k) if k in base else v
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        by = MERGE_KEYS[key]
        merged_list = list(base)
        for item in patch:
            index = next((i for i, old in enumerate(merged_list) if old[by] == item[by]), None)
            if index is None:
                merged_list.append(item)
            else:
                merged_list[index] = merge(merged_list[index], item)
        return merged_list
    return patch


def render(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The objects of a kustomization by (kind, name), its patches applied and its images set."""
    spec = kustomization(folder)
    # A field this function ignores would make its rendering differ from kustomize's without a word.
    assert set(spec) <= UNDERSTOOD, f"{folder}/kustomization.yaml uses {set(spec) - UNDERSTOOD}"
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in spec.get("resources", []):
        path = folder / entry
        found = render(path) if path.is_dir() else {_key(obj): obj for obj in [one_object(path)]}
        assert not set(found) & set(objects), f"{folder}: {entry} repeats {set(found) & set(objects)}"
        objects.update(found)
    for patch in spec.get("patches", []):
        assert set(patch) == {"path"}, patch
        obj = one_object(folder / patch["path"])
        assert _key(obj) in objects, f"{folder}: patch {patch['path']} targets {_key(obj)}, which is not a resource"
        objects[_key(obj)] = merge(copy.deepcopy(objects[_key(obj)]), obj)
    for image in spec.get("images", []):
        for obj in objects.values():
            for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def only(objects: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for (k, _), obj in objects.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


class Variant:
    """One rendered variant: its Deployment's pod and container, and the models.yaml the container reads."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.objects = render(folder)
        self.deployment = only(self.objects, "Deployment")
        self.pod = self.deployment["spec"]["template"]["spec"]
        (self.container,) = self.pod["containers"]
        self.volumes = {v["name"]: v for v in self.pod["volumes"]}
        self.mounts = {m["mountPath"]: m for m in self.container["volumeMounts"]}
        command = self.container["command"]
        assert command[0] == "reloader", command
        self.args = _parser().parse_args(command[1:])  # the real CLI: an unknown flag fails here
        self.config_path = PurePosixPath(self.args.config)
        self.config_mount = self.mounts[str(self.config_path.parent)]
        self.configmap = self.objects[("ConfigMap", self.volumes[self.config_mount["name"]]["configMap"]["name"])]
        self.config_text = self.configmap["data"][self.config_path.name]
        self.config = yaml.safe_load(self.config_text)
        self.server = ServerConfig(**self.config.get("server", {}))  # with the daemon's defaults filled in

    def port(self, port: int | str) -> int:
        """A port by number or by the container port's name, as the kubelet resolves it."""
        if isinstance(port, int):
            return port
        (number,) = [p["containerPort"] for p in self.container["ports"] if p.get("name") == port]
        return number


@pytest.fixture(params=list(VARIANTS), scope="module")
def variant(request: pytest.FixtureRequest) -> Variant:
    return Variant(VARIANTS[request.param])


# -- the Dockerfile: which repository files the image holds, and where ---------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and not line.startswith("#"))
    ]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def context_copies(instructions: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context (not --from another stage)."""
    copies = []
    for word, rest in instructions:
        if word not in ("COPY", "ADD"):
            continue
        words = yaml.safe_load(rest) if rest.startswith("[") else shlex.split(rest)
        if any(w.startswith("--from") for w in words):
            continue
        *sources, destination = [w for w in words if not w.startswith("--")]
        copies.append((sources, destination))
    return copies


def in_repository(image_path: str) -> Path:
    """The repository file that the final image holds at `image_path`, per the Dockerfile's COPY lines."""
    wanted = PurePosixPath(image_path)
    for sources, destination in context_copies(final_stage()):
        for source in sources:
            local = ROOT / source
            if local.is_dir() and wanted.is_relative_to(destination):  # a folder's contents land in destination
                return local / wanted.relative_to(destination)
            target = PurePosixPath(destination) / local.name if destination.endswith("/") else destination
            if local.is_file() and wanted == PurePosixPath(target):
                return local
    raise AssertionError(f"no COPY in the Dockerfile's final stage puts anything at {image_path}")


def dockerignored(relative: str) -> bool:
    """Docker's .dockerignore rules: the last matching pattern wins, a folder's match covers its contents."""
    excluded = False
    for line in DOCKERIGNORE.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        regex = _glob(pattern.lstrip("!").strip("/"))
        parts = relative.split("/")
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def _glob(pattern: str) -> re.Pattern[str]:
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


# -- the manifests are valid Kubernetes objects ---------------------------------------------------------


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    command = [str(KUBERNETES_VALIDATE), "--kubernetes-version", KUBERNETES_VERSION, "--strict", *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)


def test_every_manifest_passes_kubernetes_validate_strict():
    files = manifests(BASE) + manifests(OVERLAY)

    result = kubernetes_validate(*files)

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # A kind it has no schema for is only a WARN with exit 0: every file must say "passed".
    assert [line for line in lines if not line.startswith("INFO ")] == [], result.stdout
    for path in files:
        assert any(line.startswith(f"INFO {path} passed") for line in lines), f"{path}:\n{result.stdout}"
    assert all(line.endswith(f"against version {KUBERNETES_VERSION.rsplit('.', 1)[0]}") for line in lines)


def test_kubernetes_validate_strict_does_reject_an_unknown_field(tmp_path: Path):
    # The check above is only worth something if a misspelt field fails it.
    broken = tmp_path / "deployment.yaml"
    broken.write_text((BASE / "deployment.yaml").read_text().replace("readinessProbe:", "readinessProbes:"))

    result = kubernetes_validate(broken)

    assert result.returncode == 1
    assert "'readinessProbes' was unexpected" in result.stdout


def test_the_kustomization_lists_exactly_the_manifests_in_its_folder():
    spec = kustomization(BASE)

    assert sorted(spec["resources"]) == [p.name for p in manifests(BASE)]
    for path in manifests(BASE):
        one_object(path)


def test_the_shared_volume_overlay_resolves_and_uses_every_file_in_its_folder():
    spec = kustomization(OVERLAY)
    listed = [*spec["resources"], *(p["path"] for p in spec["patches"])]

    assert sorted(name for name in listed if (OVERLAY / name).is_file()) == [p.name for p in manifests(OVERLAY)]
    for name in listed:
        path = (OVERLAY / name).resolve()
        assert path.is_file() or (path / "kustomization.yaml").is_file(), name
        # kustomize refuses a base that contains its overlay ("cycle detected").
        assert not OVERLAY.resolve().is_relative_to(path) or path == OVERLAY.resolve(), name
    assert BASE.resolve() in [(OVERLAY / name).resolve() for name in spec["resources"]]
    objects = render(OVERLAY)  # a patch that targets nothing fails here
    assert set(render(BASE)) < set(objects)


# -- the probes, the ports and the config agree with the daemon ----------------------------------------


def probe_app(*, live: bool, dead: list[str]) -> httpx.AsyncClient:
    """The daemon's real app and its real health handlers, over a stand-in supervisor with one model."""
    supervisor = SimpleNamespace(
        config=SimpleNamespace(models={"shapes": None}),
        registry=SimpleNamespace(get=lambda name: object() if live else None),
    )
    app = build_app(Service(supervisor, batcher=None, alive=lambda: dead))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pod")


def probe_status(path: str, *, live: bool, dead: list[str] | None = None) -> int:
    async def get() -> int:
        async with probe_app(live=live, dead=dead or []) as client:
            return (await client.get(path)).status_code

    return asyncio.run(get())


def test_the_probes_are_routes_of_the_daemon_on_its_port(variant: Variant):
    # The handlers use the service only when called: the route table needs none.
    routes = {route.path: route.methods for route in build_app(None).routes}
    port = variant.server.port

    assert variant.server.host == "0.0.0.0"
    assert variant.args.host is None and variant.args.port is None  # the config's host and port apply
    assert [p["containerPort"] for p in variant.container["ports"]] == [port]
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = variant.container[kind]["httpGet"]
        assert probe["path"] in routes and "GET" in routes[probe["path"]], (kind, probe)
        assert variant.port(probe["port"]) == port, kind
        assert probe.get("scheme", "HTTP") == "HTTP"


def test_readiness_follows_the_models_and_liveness_and_startup_do_not(variant: Variant):
    # A pod whose models have no live version yet (an empty bucket) must finish starting and stay out of
    # the Service, not be restarted in a loop; a dead watcher or reload worker must get it restarted.
    paths = {kind: variant.container[kind]["httpGet"]["path"] for kind in ("startupProbe", "livenessProbe")}
    ready = variant.container["readinessProbe"]["httpGet"]["path"]

    assert probe_status(ready, live=False) == 503
    assert probe_status(ready, live=True) == 200
    for kind, path in paths.items():
        assert probe_status(path, live=False) == 200, kind
        assert probe_status(path, live=True, dead=["watcher"]) == 503, kind


def test_the_startup_probe_waits_long_enough_for_the_first_gate(variant: Variant):
    startup = variant.container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]

    # Downloading, loading and validating a checkpoint takes up to a minute on a slow CPU: twice that.
    assert budget >= 120
    assert "initialDelaySeconds" not in variant.container["livenessProbe"]  # the startup probe gates it


def test_the_service_and_the_disruption_budget_select_the_deployments_pods(variant: Variant):
    labels = variant.deployment["spec"]["template"]["metadata"]["labels"]
    service = only(variant.objects, "Service")
    budget = only(variant.objects, "PodDisruptionBudget")

    assert variant.deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        assert variant.port(port["targetPort"]) == variant.server.port
    assert variant.deployment["spec"]["replicas"] == 3
    assert budget["spec"]["maxUnavailable"] == 1
    assert variant.deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_config_is_the_configmap_mounted_as_a_folder_without_subpath(variant: Variant):
    volume = variant.volumes[variant.config_mount["name"]]

    assert variant.args.command == "serve"
    assert "subPath" not in variant.config_mount and "subPathExpr" not in variant.config_mount
    assert "items" not in volume["configMap"]  # every key under its own name
    assert variant.config_mount.get("readOnly") is True
    assert str(variant.config_path) == f"{variant.config_mount['mountPath']}/{variant.config_path.name}"
    assert variant.config_path.name in variant.configmap["data"]


def test_every_writable_path_is_an_emptydir_and_the_rest_is_read_only(variant: Variant):
    empty_dirs = {path for path, m in variant.mounts.items() if "emptyDir" in variant.volumes[m["name"]]}

    assert "/tmp" in empty_dirs
    uses_s3 = any(str(m["checkpoints"]).startswith("s3://") for m in variant.config["models"].values())
    if uses_s3 or "cache_dir" in variant.config:
        assert variant.config["cache_dir"] in empty_dirs
    for path, mount in variant.mounts.items():
        assert path in empty_dirs or mount.get("readOnly") is True, path


def test_the_pod_runs_as_a_numeric_non_root_user_without_privileges(variant: Variant):
    pod, container = variant.pod["securityContext"], variant.container["securityContext"]

    assert pod["runAsNonRoot"] is True
    assert isinstance(pod["runAsUser"], int) and pod["runAsUser"] > 0
    assert isinstance(pod["runAsGroup"], int) and pod["runAsGroup"] > 0
    assert pod["fsGroup"] == pod["runAsGroup"]
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert container.get("privileged", False) is False
    assert container.get("runAsUser", pod["runAsUser"]) == pod["runAsUser"]
    assert container.get("seccompProfile", pod["seccompProfile"]) == {"type": "RuntimeDefault"}
    resources = variant.container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_the_grace_period_covers_the_prestop_sleep_and_the_drain(variant: Variant):
    pre_stop = variant.container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[:-1] in (["sleep"], ["/bin/sleep"]), command
        sleep = int(command[-1])

    assert sleep > 0
    assert variant.pod["terminationGracePeriodSeconds"] > variant.server.shutdown_timeout_s + sleep


# -- the config in the ConfigMap is one the daemon accepts, and mirrors the demo's --------------------


def test_the_configmaps_models_yaml_is_a_valid_reloader_config(variant: Variant):
    data = yaml.safe_load(variant.config_text)
    # The warm-up images are absolute paths inside the image, which do not exist on this machine. The
    # Dockerfile's COPY lines say which repository file lands at each (test_the_warmup_images_are_in_the_image
    # checks that mapping): point the config at those same files and change nothing else, then let the
    # daemon's own parser judge the whole config, as it would at /etc/reloader inside the pod.
    for model in data["models"].values():
        model["warmup"]["images"] = [str(in_repository(image)) for image in model["warmup"]["images"]]
        if "evaluation" in model:
            model["evaluation"]["images"] = str(in_repository(model["evaluation"]["images"]))

    config = parse_config(data, base_dir=Path(variant.config_path.parent), source=f"{variant.folder.name} models.yaml")

    assert config.server.host == "0.0.0.0"
    assert config.server.port == variant.server.port
    assert set(config.models) == {"shapes"}


def test_the_configmaps_model_mirrors_the_demo_config(variant: Variant):
    demo = yaml.safe_load((ROOT / "config" / "models.yaml").read_text())["models"]["shapes"]
    deployed = variant.config["models"]["shapes"]

    def comparable(model: dict[str, Any]) -> dict[str, Any]:
        rest = {k: v for k, v in model.items() if k != "checkpoints"}
        rest["warmup"] = {k: v for k, v in model["warmup"].items() if k != "images"}
        rest["evaluation"] = {k: v for k, v in model.get("evaluation", {}).items() if k != "images"}
        return rest

    assert comparable(deployed) == comparable(demo)
    demo_images = [(ROOT / "config" / image).resolve() for image in demo["warmup"]["images"]]
    assert [in_repository(image).resolve() for image in deployed["warmup"]["images"]] == demo_images
    if "evaluation" in demo:
        demo_set = (ROOT / "config" / demo["evaluation"]["images"]).resolve()
        assert in_repository(deployed["evaluation"]["images"]).resolve() == demo_set


def test_the_warmup_images_are_in_the_image(variant: Variant):
    for model in variant.config["models"].values():
        for image in model["warmup"]["images"]:
            # Relative paths would resolve against the mounted ConfigMap folder, which holds no images.
            assert PurePosixPath(image).is_absolute(), image
            local = in_repository(image)
            assert local.is_file(), f"{image} comes from {local}, which is not in the repository"
            assert not dockerignored(local.relative_to(ROOT).as_posix()), f"{local} is excluded by .dockerignore"


def test_the_s3_variant_reads_a_bucket_with_credentials_only_from_the_environment():
    variant = Variant(BASE)
    secret_names = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}

    assert all(str(m["checkpoints"]).startswith("s3://") for m in variant.config["models"].values())
    assert not re.search(r"(?i)access.?key|secret|session.?token|password", variant.config_text)
    assert not [e for e in variant.container.get("env", []) if e["name"] in secret_names and "value" in e]
    assert not [obj for (kind, _), obj in variant.objects.items() if kind == "Secret"]  # the operator creates it
    assert [e["secretRef"]["name"] for e in variant.container["envFrom"]] == ["reloader-s3"]
    assert variant.pod["serviceAccountName"] == only(variant.objects, "ServiceAccount")["metadata"]["name"]


def test_the_shared_volume_variant_polls_a_read_only_readwritemany_claim():
    variant = Variant(OVERLAY)
    claims = {name for (kind, name) in variant.objects if kind == "PersistentVolumeClaim"}

    assert variant.config["watch"]["poll"] is True
    for model in variant.config["models"].values():
        folder = PurePosixPath(model["checkpoints"])
        mount = next(m for path, m in variant.mounts.items() if folder.is_relative_to(path))
        claim = variant.volumes[mount["name"]]["persistentVolumeClaim"]
        assert mount.get("readOnly") is True and claim.get("readOnly") is True
        assert claim["claimName"] in claims
        assert variant.objects[("PersistentVolumeClaim", claim["claimName"])]["spec"]["accessModes"] == [
            "ReadWriteMany"
        ]


# -- the image ---------------------------------------------------------------------------------------


def test_the_image_runs_reloader_as_the_pods_numeric_user():
    stage = final_stage()
    variant = Variant(BASE)
    pod = variant.pod["securityContext"]
    (user,) = [rest for word, rest in stage if word == "USER"]

    assert user == f"{pod['runAsUser']}:{pod['runAsGroup']}"
    assert ("ENTRYPOINT", '["reloader"]') in stage
    assert [rest for word, rest in stage if word == "EXPOSE"] == [str(variant.server.port)]
    assert re.fullmatch(r"\$\{PYTHON_IMAGE\}|python:3\.\d+-slim\S*", stage[0][1])
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.\d+-slim", DOCKERFILE.read_text())


def test_the_image_installs_the_makefiles_torch_pins_from_the_cpu_index():
    (pins,) = re.findall(r"^TORCH_PINS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    installs = [shlex.split(rest) for word, rest in dockerfile_instructions() if word == "RUN" and "pip" in rest]
    # The first install of torch comes only from the CPU index (--index-url, not --extra-index-url): no CUDA.
    torch_first = next(words for words in installs if any(w.startswith("torch==") for w in words))

    assert {pin.split("==")[0] for pin in pins.split()} == {"torch", "torchvision"}
    assert torch_first[torch_first.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    for words in installs:
        named = [w for w in words if re.match(r"torch(vision)?($|[=<>~!\[])", w)]
        assert not named or sorted(named) == sorted(pins.split()), words


def test_the_dockerignore_keeps_what_the_build_copies_and_drops_the_rest():
    for sources, _ in context_copies(dockerfile_instructions()):
        for source in sources:
            local = ROOT / source
            files = [local] if local.is_file() else [p for p in local.rglob("*") if p.is_file()]
            assert files, source
            for path in files:
                relative = path.relative_to(ROOT).as_posix()
                if "__pycache__" not in relative:
                    assert not dockerignored(relative), relative

    for dropped in (".venv/bin/python", ".git/HEAD", "checkpoints/shapes/shapes-epoch001.pt", "bench/out/x.json"):
        assert dockerignored(dropped), dropped
    assert dockerignored("reloader/__pycache__/app.cpython-311.pyc")
    assert dockerignored("tests/test_deploy.py")
