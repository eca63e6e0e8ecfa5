"""deploy/: the Dockerfile, compose files and Kubernetes manifests, checked by parsing them.

Docker and Kubernetes do not run here, so these tests check what can be checked without
them: every YAML file parses, the structure the tools rely on is there, every command line
is accepted by our real CLI parser or the installed `dask` CLI, the TLS environment
variables give Dask a working encrypted cluster, and the nightly script does what it says
(run by /bin/sh against a stand-in `kubectl` that records its calls).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import click
import dask
import pytest
import yaml
from distributed import Client, LocalCluster, Security
from distributed.cli import dask_scheduler, dask_worker

from pipeline.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
IMAGE_WORKDIR = "/opt/mfpipe"
TLS_DIR = "/etc/mfpipe/tls"
TLS_KEYS = {
    "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": "ca.pem",
    "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT": "cert.pem",
    "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY": "key.pem",
    "DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT": "cert.pem",
    "DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY": "key.pem",
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": "cert.pem",
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": "key.pem",
}
DASK_COMMANDS = {"scheduler": dask_scheduler.main, "worker": dask_worker.main}


def _documents(path: Path) -> list[Any]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def _one(path: Path) -> dict:
    (doc,) = _documents(path)
    return doc


def _kind(kind: str) -> list[dict]:
    found = [
        doc
        for path in KUBERNETES.glob("*.yaml")
        for doc in _documents(path)
        if doc.get("kind") == kind
    ]
    assert found, f"no {kind} in {KUBERNETES}"
    return found


def _walk(node: Any) -> Iterator[Any]:
    """Every value in a parsed YAML tree, descending into YAML held in ConfigMap strings."""
    yield node
    if isinstance(node, dict):
        if node.get("kind") == "ConfigMap":
            for text in node.get("data", {}).values():
                for doc in yaml.safe_load_all(text):
                    yield from _walk(doc)
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in logical]


def _command_lines() -> list[tuple[str, list[str]]]:
    """Every command line (argv list) in the Dockerfile, compose files and manifests."""
    lines = []
    for instruction, argument in _dockerfile():
        if instruction in ("CMD", "ENTRYPOINT"):
            lines.append(("Dockerfile", json.loads(argument)))
    for path in YAML_FILES:
        for doc in _documents(path):
            for node in _walk(doc):
                if not isinstance(node, dict):
                    continue
                for key in ("command", "args"):
                    value = node.get(key)
                    if isinstance(value, list) and all(isinstance(v, str) for v in value):
                        lines.append((str(path.relative_to(REPO)), value))
    return lines


def _argvs(program: str) -> list[tuple[str, list[str]]]:
    found = [(where, argv) for where, argv in _command_lines() if argv[0] == program]
    assert found
    return found


@cache
def _dask_help(subcommand: str) -> str:
    dask_cli = Path(sys.executable).with_name("dask")
    executable = str(dask_cli) if dask_cli.exists() else shutil.which("dask")
    assert executable, "the dask command line is not installed"
    done = subprocess.run(
        [executable, subcommand, "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# --- every file parses ------------------------------------------------------------------


def test_expected_files_exist() -> None:
    for name in (
        "Dockerfile",
        "docker-compose.yml",
        "docker-compose.tls.yml",
        "README.md",
        "kubernetes/daskjob.yaml",
        "kubernetes/daskjob-tls.yaml",
        "kubernetes/cronjob.yaml",
        "kubernetes/pvc.yaml",
        "kubernetes/namespace.yaml",
    ):
        assert (DEPLOY / name).is_file(), name


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    documents = _documents(path)
    assert documents
    assert all(isinstance(doc, dict) for doc in documents)


# --- command lines ----------------------------------------------------------------------


def test_mfpipe_command_lines_parse_with_our_cli() -> None:
    parser = build_parser()
    for where, argv in _argvs("mfpipe"):
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: mfpipe rejects {shlex.join(argv)}")
        assert args.command == "run", where
        assert argv[2] == "jobs/quickstart.toml", where
        assert (REPO / argv[2]).is_file(), f"{where}: {argv[2]} is not in the repository"
        assert argv[argv.index("--output") + 1] == "/data/output", where


def test_dask_command_lines_accepted_by_installed_dask() -> None:
    for where, argv in _argvs("dask"):
        subcommand = argv[1]
        assert subcommand in DASK_COMMANDS, f"{where}: unknown dask subcommand {subcommand}"
        help_text = _dask_help(subcommand)
        for token in argv[2:]:
            if token.startswith("--"):
                flag = token.split("=", 1)[0]
                assert re.search(rf"(^|[\s,/]){re.escape(flag)}\b", help_text), (
                    f"{where}: dask {subcommand} has no option {flag}"
                )
        # The installed click command parses and type-checks the arguments.
        try:
            context = DASK_COMMANDS[subcommand].make_context(f"dask {subcommand}", argv[2:])
        except click.ClickException as exc:
            pytest.fail(f"{where}: dask {subcommand} rejects {shlex.join(argv)}: {exc}")
        if subcommand == "worker":
            assert context.params["nthreads"] == 1, where
            address = context.params["scheduler"]
            assert address is None or re.fullmatch(r"(tcp|tls)://[\w.-]+:8786", address), where


# --- Dockerfile -------------------------------------------------------------------------


def test_dockerfile() -> None:
    instructions = _dockerfile()
    names = [name for name, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert names.count("FROM") == 1
    runs = " && ".join(argument for name, argument in instructions if name == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs)
    assert "useradd --uid 10001" in runs
    users = [argument for name, argument in instructions if name == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    assert names.index("USER") > max(i for i, name in enumerate(names) if name == "RUN")
    workdirs = [argument for name, argument in instructions if name == "WORKDIR"]
    assert workdirs[-1] == IMAGE_WORKDIR
    copies = [argument.split() for name, argument in instructions if name == "COPY"]
    sources = [part for parts in copies for part in parts[:-1] if not part.startswith("--")]
    assert "jobs" in sources
    ignore = [
        line
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*", "the build context is an allowlist"
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f"COPY {source}: ignored"
    exposed = " ".join(argument for name, argument in instructions if name == "EXPOSE").split()
    assert {"8786", "8787"} <= set(exposed)
    assert "ENTRYPOINT" not in names  # compose and Kubernetes set each role's command
    (cmd,) = [json.loads(argument) for name, argument in instructions if name == "CMD"]
    assert cmd == [
        "mfpipe",
        "run",
        "jobs/quickstart.toml",
        "--scheduler",
        "tcp://scheduler:8786",
        "--output",
        "/data/output",
    ]


# --- docker compose ---------------------------------------------------------------------


def test_compose_services() -> None:
    compose = _one(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"scheduler", "worker", "runner"}
    images = {service["image"] for service in services.values()}
    assert len(images) == 1, "scheduler, workers and runner must share one image"
    build = services["scheduler"]["build"]
    assert (DEPLOY / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert services["scheduler"]["command"][:2] == ["dask", "scheduler"]
    assert services["worker"]["command"] == [
        "dask",
        "worker",
        "tcp://scheduler:8786",
        "--nthreads",
        "1",
    ]
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["runner"]["command"] == [
        "mfpipe",
        "run",
        "jobs/quickstart.toml",
        "--scheduler",
        "tcp://scheduler:8786",
        "--output",
        "/data/output",
    ]
    assert "scheduler" in services["runner"]["depends_on"]
    assert "8787:8787" in services["scheduler"]["ports"]
    for name, service in services.items():
        assert "data:/data" in service["volumes"], name
    assert "data" in compose["volumes"]


def test_compose_tls_override() -> None:
    override = _one(DEPLOY / "docker-compose.tls.yml")
    services = override["services"]
    assert set(services) == {"scheduler", "worker", "runner"}
    for name, service in services.items():
        environment = service["environment"]
        for key, filename in TLS_KEYS.items():
            assert environment[key] == f"{TLS_DIR}/{filename}", (name, key)
        assert environment["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
        assert f"./certs:{TLS_DIR}:ro" in service["volumes"], name
    assert services["scheduler"]["command"][:4] == ["dask", "scheduler", "--protocol", "tls"]
    assert services["worker"]["command"][2] == "tls://scheduler:8786"
    runner = services["runner"]["command"]
    assert runner[runner.index("--scheduler") + 1] == "tls://scheduler:8786"
    assert not any("tcp://" in arg for s in services.values() for arg in s["command"])


# --- Kubernetes -------------------------------------------------------------------------


def test_every_manifest_is_namespaced_and_named() -> None:
    for path in KUBERNETES.glob("*.yaml"):
        for doc in _documents(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "mfpipe", (path.name, doc["kind"])


def _containers(daskjob: dict) -> dict[str, dict]:
    spec = daskjob["spec"]
    pods = {
        "job": spec["job"]["spec"],
        "worker": spec["cluster"]["spec"]["worker"]["spec"],
        "scheduler": spec["cluster"]["spec"]["scheduler"]["spec"],
    }
    return {role: (pod, pod["containers"][0]) for role, pod in pods.items()}


def _check_daskjob(daskjob: dict) -> None:
    name = daskjob["metadata"]["name"]
    assert daskjob["apiVersion"] == "kubernetes.dask.org/v1"
    assert daskjob["kind"] == "DaskJob"
    spec = daskjob["spec"]
    assert spec["job"]["spec"]["restartPolicy"] == "Never"
    assert spec["cluster"]["spec"]["worker"]["replicas"] >= 1
    containers = _containers(daskjob)
    images = {container["image"] for _, container in containers.values()}
    assert len(images) == 1, images
    assert containers["job"][1]["args"][:2] == ["mfpipe", "run"]
    assert containers["worker"][1]["args"][:2] == ["dask", "worker"]
    assert containers["scheduler"][1]["args"][:2] == ["dask", "scheduler"]
    for role, (pod, _) in containers.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, role
        assert pod["securityContext"]["runAsUser"] == 10001, role
    scheduler = containers["scheduler"][1]
    container_ports = {port["name"]: port["containerPort"] for port in scheduler["ports"]}
    assert container_ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    service = spec["cluster"]["spec"]["scheduler"]["service"]
    assert service["selector"] == {
        "dask.org/cluster-name": name,
        "dask.org/component": "scheduler",
    }
    ports = {port["port"]: port["targetPort"] for port in service["ports"]}
    assert ports == {8786: "tcp-comm", 8787: "http-dashboard"}
    claims = {pvc["metadata"]["name"] for pvc in _kind("PersistentVolumeClaim")}
    for role in ("job", "worker"):
        pod, container = containers[role]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        assert mounts["data"] == "/data", role
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] in claims, role


def test_daskjob() -> None:
    daskjob = _one(KUBERNETES / "daskjob.yaml")
    _check_daskjob(daskjob)
    job = _containers(daskjob)["job"][1]["args"]
    assert "--scheduler" not in job  # the operator sets DASK_SCHEDULER_ADDRESS


def test_daskjob_tls() -> None:
    daskjob = _one(KUBERNETES / "daskjob-tls.yaml")
    _check_daskjob(daskjob)
    name = daskjob["metadata"]["name"]
    address = f"tls://{name}-scheduler.mfpipe.svc.cluster.local:8786"
    for role, (pod, container) in _containers(daskjob).items():
        environment = {item["name"]: item["value"] for item in container["env"]}
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        secret = volumes["tls"]["secret"]
        assert secret["secretName"] == "mfpipe-tls", role
        assert mounts["tls"] == TLS_DIR, role
        assert pod["securityContext"]["fsGroup"] == 10001, role  # the key is group-readable
        assert secret["defaultMode"] & stat.S_IRGRP
        for key, filename in TLS_KEYS.items():
            assert environment[key] == f"{TLS_DIR}/{filename}", (role, key)
        assert environment["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True", role
        if role != "scheduler":
            assert environment["DASK_SCHEDULER_ADDRESS"] == address, role
    scheduler_args = _containers(daskjob)["scheduler"][1]["args"]
    assert scheduler_args[scheduler_args.index("--protocol") + 1] == "tls"


def test_pvc() -> None:
    (pvc,) = _kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert re.fullmatch(r"\d+[GT]i", pvc["spec"]["resources"]["requests"]["storage"])


def test_cronjob() -> None:
    (cronjob,) = _kind("CronJob")
    assert cronjob["apiVersion"] == "batch/v1"
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    minute, hour, *rest = spec["schedule"].split()
    assert 0 <= int(minute) < 60
    assert 0 <= int(hour) < 24
    assert rest == ["*", "*", "*"], "nightly: every day"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (account,) = _kind("ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    (role,) = _kind("Role")
    (binding,) = _kind("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"]}.items() <= (
        binding["subjects"][0].items()
    )
    (rule,) = [r for r in role["rules"] if "kubernetes.dask.org" in r["apiGroups"]]
    assert "daskjobs" in rule["resources"]
    assert {"create", "get", "list", "delete"} <= set(rule["verbs"])
    # The template the job reads is the ConfigMap that is mounted where TEMPLATE points.
    (container,) = pod["containers"]
    environment = {item["name"]: item["value"] for item in container["env"]}
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (configmap,) = _kind("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    template_key = Path(environment["TEMPLATE"]).relative_to(mount["mountPath"])
    assert str(template_key) in configmap["data"]


def test_nightly_template_matches_daskjob() -> None:
    (configmap,) = _kind("ConfigMap")
    (text,) = configmap["data"].values()
    template = yaml.safe_load(text)
    reference = _one(KUBERNETES / "daskjob.yaml")
    assert template["metadata"]["labels"].pop("mfpipe/schedule") == "nightly"
    name = template["metadata"]["name"]
    template["metadata"]["name"] = reference["metadata"]["name"]
    selector = template["spec"]["cluster"]["spec"]["scheduler"]["service"]["selector"]
    assert selector["dask.org/cluster-name"] == name
    selector["dask.org/cluster-name"] = reference["metadata"]["name"]
    assert template == reference


# --- the nightly script, run by /bin/sh -------------------------------------------------

FAKE_KUBECTL = """#!/bin/sh
# Records each call; answers like the API server would for the calls the script makes.
echo "$*" >> "$FAKE_DIR/calls"
case "$*" in
  *"get daskjobs"*) cat "$FAKE_DIR/existing" ;;
  *"create -f -"*) cat > "$FAKE_DIR/created.yaml" ;;
  *"get daskjob "*)
    n=$(cat "$FAKE_DIR/polls" 2>/dev/null || echo 0); echo $((n + 1)) > "$FAKE_DIR/polls"
    if [ "$n" -lt 2 ]; then echo Running; else cat "$FAKE_DIR/final"; fi ;;
esac
"""


def _run_nightly(tmp_path: Path, final: str, existing: int) -> tuple[int, list[str], dict]:
    (cronjob,) = _kind("CronJob")
    (configmap,) = _kind("ConfigMap")
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    fake = tmp_path / "fake"
    fake.mkdir()
    kubectl = fake / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    (fake / "existing").write_text(
        "".join(f"daskjob.kubernetes.dask.org/mfpipe-nightly-old{i}\n" for i in range(existing))
    )
    (fake / "final").write_text(final + "\n")
    template = tmp_path / "daskjob.yaml"
    (text,) = configmap["data"].values()
    template.write_text(text)
    environment = {item["name"]: item["value"] for item in container["env"]}
    environment |= {
        "TEMPLATE": str(template),
        "POLL_SECONDS": "0",
        "FAKE_DIR": str(fake),
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    calls = (fake / "calls").read_text().splitlines()
    created = yaml.safe_load((fake / "created.yaml").read_text())
    return done.returncode, calls, created


@pytest.mark.skipif(shutil.which("sed") is None, reason="needs sed, as in the kubectl image")
def test_nightly_script_creates_unique_daskjob_and_waits(tmp_path: Path) -> None:
    returncode, calls, created = _run_nightly(tmp_path, "Successful", existing=9)
    assert returncode == 0
    name = created["metadata"]["name"]
    assert re.fullmatch(r"mfpipe-nightly-\d{8}-\d{6}", name)
    selector = created["spec"]["cluster"]["spec"]["scheduler"]["service"]["selector"]
    assert selector["dask.org/cluster-name"] == name
    _check_daskjob(created)
    # The two oldest of nine are deleted, keeping seven; then three status polls.
    deletes = [call for call in calls if " delete " in f" {call} "]
    assert deletes == [
        "-n mfpipe delete daskjob.kubernetes.dask.org/mfpipe-nightly-old0 "
        "daskjob.kubernetes.dask.org/mfpipe-nightly-old1"
    ]
    assert sum(f"get daskjob {name}" in call for call in calls) == 3


@pytest.mark.skipif(shutil.which("sed") is None, reason="needs sed, as in the kubectl image")
def test_nightly_script_fails_when_the_run_fails(tmp_path: Path) -> None:
    returncode, calls, _ = _run_nightly(tmp_path, "Failed", existing=0)
    assert returncode == 1
    assert not any(" delete " in f" {call} " for call in calls)


# --- TLS: the environment variables give a working encrypted cluster --------------------


def _readme_certificates(folder: Path) -> None:
    """Run the certificate commands of deploy/README.md in `folder`."""
    readme = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL)
    (recipe,) = [block for block in blocks if "openssl req" in block]
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", recipe],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def _trustme_certificates(folder: Path) -> None:
    import trustme

    authority = trustme.CA()
    issued = authority.issue_cert("scheduler", "localhost", "127.0.0.1")
    authority.cert_pem.write_to_path(str(folder / "ca.pem"))
    issued.private_key_pem.write_to_path(str(folder / "key.pem"))
    issued.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))


@pytest.mark.cluster
@pytest.mark.parametrize("source", ["trustme", "readme-openssl"])
def test_tls_environment_gives_encrypted_cluster(tmp_path: Path, source: str) -> None:
    if source == "readme-openssl":
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed")
        _readme_certificates(tmp_path)
    else:
        _trustme_certificates(tmp_path)
    assert {"ca.pem", "cert.pem", "key.pem"} <= {p.name for p in tmp_path.iterdir()}
    environment = _one(DEPLOY / "docker-compose.tls.yml")["services"]["worker"]["environment"]
    local = {key: value.replace(TLS_DIR, str(tmp_path)) for key, value in environment.items()}
    with dask.config.set(dask.config.merge(dask.config.config, dask.config.collect_env(local))):
        security = Security()
        assert security.require_encryption
        with (
            LocalCluster(
                n_workers=1,
                threads_per_worker=1,
                processes=False,
                protocol="tls://",
                security=security,
                dashboard_address=None,
            ) as cluster,
            Client(cluster, security=security) as client,
        ):
            assert cluster.scheduler_address.startswith("tls://")
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
            plain = cluster.scheduler_address.replace("tls://", "tcp://")
            with pytest.raises(OSError):
                Client(plain, security=Security(require_encryption=False), timeout="2s")
