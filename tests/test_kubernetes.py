"""docs/kubernetes: every manifest validates against the Kubernetes schemas (offline), and the pieces
a deployment relies on are there: readiness means setup done, tokens only from a Secret, a shared
ReadWriteMany volume, one GPU per pod, a grace period for the running prediction."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DIR = Path(__file__).resolve().parent.parent / "docs" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"


def manifests() -> dict[str, dict]:
    kustomization = yaml.safe_load((DIR / "kustomization.yaml").read_text())
    docs = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((DIR / name).read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((DIR / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in DIR.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("name", sorted(manifests()))
def test_manifest_is_valid_kubernetes(name: str) -> None:
    kubernetes_validate.validate(manifests()[name], KUBERNETES_VERSION, strict=True)


def test_an_invalid_manifest_is_caught() -> None:
    broken = json.loads(json.dumps(manifests()["Deployment/flux-lora"]))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _pod() -> dict:
    return manifests()["Deployment/flux-lora"]["spec"]["template"]["spec"]


def test_tokens_come_from_a_secret_only() -> None:
    docs = manifests()
    containers = _pod()["containers"] + docs["Job/flux-lora-download-base"]["spec"]["template"]["spec"]["containers"]
    for container in containers:
        for var in container.get("env", []):
            if "TOKEN" in var["name"]:
                assert "value" not in var and var["valueFrom"]["secretKeyRef"]["name"] == "flux-lora-tokens"
    assert not any("TOKEN" in key for key in docs["ConfigMap/flux-lora-config"]["data"])


def test_store_is_shared_and_filled_by_the_job_first() -> None:
    docs = manifests()
    assert docs["PersistentVolumeClaim/flux-lora-weights"]["spec"]["accessModes"] == ["ReadWriteMany"]
    job = docs["Job/flux-lora-download-base"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["python", "-m", "flux_lora", "weights", "download-base"]
    config = docs["ConfigMap/flux-lora-config"]["data"]
    assert config["FLUX_LORA_WEIGHTS"] == "/weights" and config["FLUX_LORA_OFFLINE"] == "1"
    for spec in (_pod(), docs["Job/flux-lora-download-base"]["spec"]["template"]["spec"]):
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "flux-lora-weights"


def test_pods_have_a_gpu_probes_grace_and_stay_inside_the_cluster() -> None:
    docs = manifests()
    pod = _pod()
    cog = pod["containers"][0]
    assert cog["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] >= 300
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(cog)
    startup = cog["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # setup: load, quantize, compile
    assert "--upload-url" in cog["command"]
    assert docs["Service/flux-lora"]["spec"]["type"] == "ClusterIP"
    assert docs["PodDisruptionBudget/flux-lora"]["spec"]["maxUnavailable"] == 1


class _Health(BaseHTTPRequestHandler):
    status = "STARTING"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps({"status": type(self).status}).encode()
        self.send_response(200)  # cog answers 200 during setup too: only the status tells
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "ready"), [("STARTING", False), ("SETUP_FAILED", False), ("READY", True),
                                               ("BUSY", True)])
def test_readiness_reads_the_status_not_the_code(status: str, ready: bool) -> None:
    """The readiness probe's own command, run against a server answering 200 with each status."""
    handler = type("Health", (_Health,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        command = _pod()["containers"][0]["readinessProbe"]["exec"]["command"]
        assert command[:2] == ["python", "-c"]
        code = command[2].replace("127.0.0.1:5000", f"127.0.0.1:{server.server_address[1]}")
        assert code != command[2]
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
        assert (result.returncode == 0) is ready, result.stderr.decode()[-500:]
    finally:
        server.shutdown()
        server.server_close()
