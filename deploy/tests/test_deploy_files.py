"""The Dockerfile, docker-compose.yml and deploy/ files stay consistent with the service they deploy: settings
names and values, ports, the health route, build targets, volumes, secrets. No Docker engine, no network."""

from __future__ import annotations

import ast
import fnmatch
import http.server
import re
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import typer
import yaml
from packaging.requirements import Requirement
from starlette.routing import Match

from deploy.requirements import requirement_lines, requirement_name, requirements
from service.app import create_app
from service.settings import Settings
from xclip_serve.cli import app as cli_app

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
SCRIPTS = sorted((ROOT / "deploy").glob("*.sh"))
SERVE_TARGETS = ("serve-cpu", "serve-gpu")
XCLIP_VAR = re.compile(r"\bXCLIP_[A-Z0-9_]+\b")
FIRST_PARTY = {"core", "training", "index", "service", "xclip_serve", "deploy", "bench", "api_tests"}


# -- reading the files ------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One `FROM ... AS name` stage: its base and its instructions as (KEYWORD, arguments)."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        """ENV of this stage alone (`ENV A=1 B=2` form)."""
        pairs = [shlex.split(rest) for rest in self.args("ENV")]
        return dict(item.split("=", 1) for items in pairs for item in items)


def dockerfile_stages(text: str = DOCKERFILE.read_text()) -> dict[str, Stage]:
    """Stages by name, from the Dockerfile with comments dropped and continuation lines joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    stages: dict[str, Stage] = {}
    current = None
    for instruction in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if not instruction.strip():
            continue
        keyword, _, rest = instruction.strip().partition(" ")
        if keyword.upper() == "FROM":
            words = rest.split()
            current = Stage(words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else "", words[0])
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword.upper(), rest.strip()))
    return stages


def stage_env(stages: dict[str, Stage], name: str) -> dict[str, str]:
    """ENV a stage inherits from the stages it is built FROM, then its own."""
    stage = stages[name]
    inherited = stage_env(stages, stage.base) if stage.base in stages else {}
    return inherited | stage.env()


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_file_values(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a dotenv file, surrounding quotes removed."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().removeprefix("'").removesuffix("'")
    return values


def setting_env_names() -> set[str]:
    return {f"XCLIP_{name.upper()}" for name in Settings.model_fields}


def cli_env_names() -> set[str]:
    """Environment variables read by options of the `xclip-serve` command line (e.g. XCLIP_ADMIN_KEY)."""
    names: set[str] = set()
    stack = [typer.main.get_command(cli_app)]
    while stack:
        command = stack.pop()
        stack += list(getattr(command, "commands", {}).values())
        for param in command.params:
            envvar = param.envvar
            names |= {envvar} if isinstance(envvar, str) else set(envvar or ())
    return names


def service_settings(name: str) -> dict[str, str]:
    """XCLIP_* variables a compose service runs with: its image target's ENV, then compose `environment`."""
    spec = compose()["services"][name]
    image_env = stage_env(dockerfile_stages(), spec["build"]["target"])
    merged = image_env | {k: str(v) for k, v in (spec.get("environment") or {}).items() if v is not None}
    return {k: v for k, v in merged.items() if k.startswith("XCLIP_")}


def served_port(env: dict[str, str]) -> int:
    return int(env.get("XCLIP_PORT", Settings.model_fields["port"].default))


def serving_services() -> list[str]:
    return [n for n, s in compose()["services"].items() if s.get("build", {}).get("target") in SERVE_TARGETS]


def healthcheck_code(stage: Stage) -> str:
    """The Python source of a HEALTHCHECK `CMD ["python", "-c", CODE]`."""
    (healthcheck,) = stage.args("HEALTHCHECK")
    command = yaml.safe_load(healthcheck.split(" CMD ", 1)[1])  # the exec form is a JSON array
    assert command[:2] == ["python", "-c"], command
    return command[2]


def routed(path: str) -> bool:
    """Whether the service app has a GET route for `path`."""
    app = create_app(Settings(auth_disabled=True))
    scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes)


def volume_mounts(spec: dict) -> dict[str, str]:
    """{container path: source} of a compose service's short-syntax volumes."""
    return {parts[1]: parts[0] for parts in (v.split(":") for v in spec.get("volumes", []))}


def ignored_by_docker(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` leave `path` (or a folder above it) out of the build context (fnmatch's `*`
    also crosses `/`, unlike Docker's: this errs towards "ignored", the safe side for COPY sources)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        forms = [pattern, pattern.removeprefix("**/")] if pattern.startswith("**/") else [pattern]
        hit = any(fnmatch.fnmatchcase(c, f) or (f != pattern and fnmatch.fnmatchcase(c.rsplit("/", 1)[-1], f))
                  for c in candidates for f in forms)
        if hit:
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def requirements_calls(stage: Stage) -> list[list[str]]:
    """Arguments of every `python requirements.py pyproject.toml ...` in a stage's RUN lines."""
    calls = []
    for run in stage.args("RUN"):
        for match in re.finditer(r"python requirements\.py pyproject\.toml ([^>&|]*)", run):
            calls.append(match.group(1).split())
    return calls


def requirement_names_of(call: list[str]) -> set[str]:
    """Project names a `requirements.py pyproject.toml ...` call lists, through the script's own parser."""
    return {requirement_name(line) for line in requirement_lines([str(ROOT / "pyproject.toml"), *call])}


def third_party_imports(package: str, module_level_only: bool) -> dict[str, str]:
    """{top-level module: first file importing it} of a package's non-test code (lazy imports too unless
    `module_level_only`), first-party and standard-library modules left out."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if "tests" in path.relative_to(ROOT).parts:
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body if module_level_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names} - FIRST_PARTY - set(sys.stdlib_module_names):
                found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def installed_closure(lines: list[str]) -> set[str]:
    """Project names `pip install` of these requirement lines brings in, from the installed packages' metadata."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [Requirement(line) for line in lines]
    while todo:
        requirement = todo.pop()
        key = (requirement_name(requirement.name), tuple(sorted(requirement.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            dependency = Requirement(line)
            extras = requirement.extras or {""}
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dependency)
    return {name for name, _ in seen}


# -- Dockerfile -------------------------------------------------------------------------------------------------------
def test_dockerfile_has_the_three_targets_and_each_runs_as_an_unprivileged_user():
    stages = dockerfile_stages()
    for target in (*SERVE_TARGETS, "train"):
        users = stages[target].args("USER")
        assert users, f"{target} runs as root"
        assert users[-1].split(":")[0] not in ("0", "root"), f"{target} runs as root"


@pytest.mark.parametrize("target", SERVE_TARGETS)
def test_serving_image_starts_the_service_on_the_port_it_exposes(target):
    stage = dockerfile_stages()[target]
    env = stage_env(dockerfile_stages(), target)
    assert stage.args("ENTRYPOINT") == ['["xclip-serve", "serve"]']
    assert stage.args("EXPOSE") == [str(served_port(env))]
    assert env["XCLIP_HOST"] == "0.0.0.0", "a container must listen beyond its own loopback"


@pytest.mark.parametrize("target", SERVE_TARGETS)
def test_healthcheck_probes_a_readiness_route_of_the_app(target):
    code = healthcheck_code(dockerfile_stages()[target])
    paths = re.findall(r"https?://[^/']+(/[A-Za-z0-9_/.-]*)", code)
    assert paths == ["/readyz"]
    assert routed("/readyz")
    assert not routed("/readyz-typo")  # the route check itself can fail
    assert f"'XCLIP_PORT', '{Settings.model_fields['port'].default}'" in code, "fallback port != Settings' default"


class _Probe(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("target", SERVE_TARGETS)
@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_passes_when_ready_and_fails_on_503(target, status, healthy):
    handler = type("Probe", (_Probe,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = healthcheck_code(dockerfile_stages()[target])
        env = {"XCLIP_PORT": str(server.server_address[1]), "PATH": ""}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30,
                                check=False)
    finally:
        server.shutdown()
    assert (result.returncode == 0) == healthy, result.stderr.decode()[-500:]


def test_serving_images_install_no_torch():
    stages = dockerfile_stages()
    for builder in ("serve-cpu-builder", "serve-gpu-builder"):
        calls = requirements_calls(stages[builder])
        assert calls, f"{builder} installs nothing from pyproject"
        names = set().union(*(requirement_names_of(call) for call in calls))
        assert "torch" not in names and "fastapi" in names and "tokenizers" in names


# which code each image runs: the service's packages (every import, lazy ones too) and core's module level; the
# train image runs all of it
IMAGE_CODE = {
    "serve": (["serve"], [("service", False), ("index", False), ("core", True)]),
    "train": (["train", "serve"], [(p, False) for p in ("core", "training", "index", "service", "xclip_serve")]),
}


@pytest.mark.parametrize("image", IMAGE_CODE)
def test_image_dependencies_provide_every_module_its_code_imports(image):
    extras, packages = IMAGE_CODE[image]
    provided = installed_closure(requirements(ROOT / "pyproject.toml", extras))
    providers = metadata.packages_distributions()
    missing = {module: path for package, module_level in packages
               for module, path in third_party_imports(package, module_level).items()
               if not {requirement_name(d) for d in providers.get(module, [])} & provided}
    assert not missing, f"imported but not installed by the {extras} extras: {missing}"


def test_gpu_pins_satisfy_the_gpu_extra():
    stages = dockerfile_stages()
    pins = dict(arg.split("=", 1) for arg in stages["serve-gpu-builder"].args("ARG"))
    pinned = {"onnxruntime-gpu": pins["ORT_GPU_VERSION"], "faiss-gpu-cu12": pins["FAISS_GPU_VERSION"]}
    for line in requirements(ROOT / "pyproject.toml", ["gpu"], core=False):
        requirement = Requirement(line)
        assert requirement.specifier.contains(pinned[requirement_name(line)]), (line, pinned)


def test_train_image_installs_the_pinned_torch_from_the_cpu_index_by_default():
    stage = dockerfile_stages()["train-builder"]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in stage.args("ARG")
    assert ["train", "--no-core", "--only", "torch"] in requirements_calls(stage)
    assert requirements(ROOT / "pyproject.toml", ["train"], core=False, only=["torch"]) == ["torch==2.13.0"]


def test_build_context_keeps_what_the_dockerfile_copies_and_drops_secrets_and_outputs():
    patterns = dockerignore_patterns()
    copied = [src for stage in dockerfile_stages().values() for rest in stage.args("COPY")
              if "--from=" not in rest for src in rest.split()[:-1] if not src.startswith("--")]
    assert "pyproject.toml" in copied and "deploy/requirements.py" in copied
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not ignored_by_docker(source, patterns), f"COPY {source} is excluded by .dockerignore"
    for path in (".env", ".venv/bin/python", ".git/HEAD", "runs/xclip", "bundles/xclip", "serve-state/models.json",
                 ".cache/data", "core/__pycache__/x.pyc", "core/tests/test_bundle.py"):
        assert ignored_by_docker(path, patterns), f"{path} would be sent to the Docker daemon"


# -- docker-compose.yml -----------------------------------------------------------------------------------------------
def test_compose_services_build_existing_targets():
    stages = dockerfile_stages()
    built = {name: spec["build"] for name, spec in compose()["services"].items() if "build" in spec}
    assert {"init", "service", "service-gpu", "trainer"} <= set(built)
    for name, build in built.items():
        assert build["target"] in stages, f"{name}: no Dockerfile target {build['target']}"
        assert (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).is_file()


@pytest.mark.parametrize("source", ["Dockerfile", "docker-compose.yml", "deploy/env.example",
                                    *(str(p.relative_to(ROOT)) for p in SCRIPTS)])
def test_every_xclip_variable_is_a_setting_or_a_cli_option(source):
    used = set(XCLIP_VAR.findall((ROOT / source).read_text()))
    unknown = used - setting_env_names() - cli_env_names()
    assert not unknown, f"{source} uses {sorted(unknown)}: neither a Settings field nor a CLI option's envvar"


@pytest.mark.parametrize("name", serving_services())
def test_service_settings_validate_and_publish_the_port_it_listens_on(name):
    env = service_settings(name)
    Settings(**{k.removeprefix("XCLIP_").lower(): v for k, v in env.items()}, auth_disabled=True)
    published = [str(p).rsplit(":", 1)[-1] for p in compose()["services"][name]["ports"]]
    assert published == [str(served_port(env))]


def test_gpu_service_reserves_an_nvidia_gpu_and_answers_as_service():
    spec = compose()["services"]["service-gpu"]
    assert spec["profiles"] == ["gpu"]
    (device,) = spec["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "service" in spec["networks"]["default"]["aliases"]
    assert service_settings("service-gpu")["XCLIP_PROVIDERS"] == "cuda"


@pytest.mark.parametrize("name", serving_services())
def test_init_writes_the_bundle_and_collections_where_the_service_reads_them(name):
    services = compose()["services"]
    spec, init = services[name], services["init"]
    assert spec["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert "profiles" not in init, "the demo must be built by a plain `docker compose up`"
    for key in ("XCLIP_BUNDLE", "XCLIP_STATE_DIR"):
        assert init["environment"][key] == service_settings(name)[key]
    env = service_settings(name)
    serve_mounts, init_mounts = volume_mounts(spec), volume_mounts(init)
    bundle_root = str(Path(env["XCLIP_BUNDLE"]).parent)
    state_dir = env["XCLIP_STATE_DIR"]
    assert serve_mounts[state_dir] == init_mounts[state_dir] == "state"
    assert serve_mounts[bundle_root] == init_mounts[bundle_root] == "bundles"
    script = (ROOT / "deploy" / "demo-init.sh").read_text()
    assert '--root "$COLLECTIONS"' in script and "COLLECTIONS=$XCLIP_STATE_DIR/collections" in script
    assert Settings(state_dir=state_dir, auth_disabled=True).collections_dir == Path(state_dir) / "collections"


def train_options(command: str) -> dict[str, str | None]:
    """`xclip-serve train`'s options in a shell command line, but those naming paths and --no-resume (the compose
    demo resumes an interrupted first start)."""
    line = command[command.index("xclip-serve train"):].replace("\\\n", " ").splitlines()[0]
    words = shlex.split(line)[2:]
    options: dict[str, str | None] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
            options[word] = value
    return {k: v for k, v in options.items() if k not in ("--data", "--output", "--text-tower", "--no-resume")}


def test_the_compose_demo_trains_the_makefiles_demo_recipe():
    dry_run = subprocess.run(["make", "-n", "--no-print-directory", "demo"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    make_demo = train_options(dry_run)
    assert "xclip-serve data minilm" in dry_run and "--lock-text" in make_demo
    init = (ROOT / "deploy" / "demo-init.sh").read_text()
    assert "xclip-serve data minilm" in init and train_options(init) == make_demo
    retrain = (ROOT / "deploy" / "retrain.sh").read_text()
    default_args = re.search(r'TRAIN_ARGS="([^"]+)"', retrain).group(1)
    assert "xclip-serve data minilm" in retrain and train_options(f"xclip-serve train {default_args}") == make_demo


def test_trainer_exports_into_the_services_bundles_and_deploys_to_it():
    services = compose()["services"]
    trainer = services["trainer"]
    assert trainer["profiles"] == ["train"]
    assert volume_mounts(trainer)["/data/bundles"] == volume_mounts(services["service"])["/data/bundles"]
    script = (ROOT / "deploy" / "retrain.sh").read_text()
    assert "BUNDLE=/data/bundles/$NAME" in script
    deploy = re.search(r"xclip-serve deploy --server http://([\w-]+):(\d+) --bundle \"\$BUNDLE\"", script)
    assert deploy, "retrain.sh must end by deploying the new bundle"
    host, port = deploy.group(1), int(deploy.group(2))
    assert host == "service" and port == served_port(service_settings("service"))
    assert "XCLIP_ADMIN_KEY" in cli_env_names(), "`xclip-serve deploy` must read the admin key from the env"


def test_prometheus_scrapes_the_service_metrics_route():
    spec = compose()["services"]["prometheus"]
    assert spec["profiles"] == ["monitoring"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert routed(job["metrics_path"])
    assert job["static_configs"][0]["targets"] == [f"service:{served_port(service_settings('service'))}"]
    assert volume_mounts(spec)["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus.yml"


def test_volumes_are_named_and_declared_and_bind_mounts_exist():
    spec = compose()
    declared = set(spec["volumes"])
    for name, service in spec["services"].items():
        for target, source in volume_mounts(service).items():
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} for {target} is not declared"


def test_secrets_come_from_a_git_ignored_env_file_whose_example_works():
    env_files = {f for service in compose()["services"].values() for f in service.get("env_file", [])}
    assert env_files == {".env"}
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True, check=False)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, ".env is not git-ignored"
    example = env_file_values(ENV_EXAMPLE)
    scopes = Settings(api_keys=example["XCLIP_API_KEYS"]).key_scopes()
    assert "admin" in scopes[example["XCLIP_ADMIN_KEY"]], "the example's XCLIP_ADMIN_KEY is no admin key"
    assert all("CHANGE-ME" in key for key in scopes), "the example must hold placeholders, not usable keys"


# -- deploy/requirements.py -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extras, options, present, absent", [
    (["serve"], {}, {"numpy", "tokenizers", "fastapi", "uvicorn", "faiss-cpu"}, {"torch", "pytest"}),
    (["train", "serve"], {}, {"torch", "onnxruntime", "faiss-cpu"}, {"pytest"}),
    (["serve"], {"without": ["onnxruntime", "faiss_cpu"]}, {"fastapi"}, {"onnxruntime", "faiss-cpu"}),
    (["train"], {"core": False, "only": ["torch"]}, {"torch"}, {"numpy", "onnx"}),
])
def test_requirements_lists_core_and_extras(extras, options, present, absent):
    names = [requirement_name(line) for line in requirements(ROOT / "pyproject.toml", extras, **options)]
    assert present <= set(names) and not absent & set(names)
    assert len(names) == len(set(names)), "duplicates across extras"


def test_requirements_refuses_an_unknown_extra():
    with pytest.raises(ValueError, match="unknown extras"):
        requirements(ROOT / "pyproject.toml", ["serv"])
