"""The Kubernetes manifests render (kubectl kustomize) and every resource validates
against the Kubernetes schemas and, for KEDA's ScaledObject and the ServiceMonitor,
against their CRD schemas (deploy/kubernetes/validate.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VALIDATE = ROOT / "deploy" / "kubernetes" / "validate"


def test_manifests_render_and_validate():
    if shutil.which("kubectl") is None or shutil.which("node") is None:
        pytest.skip("kubectl and node are needed (.ci/run installs them)")
    if not (VALIDATE / "node_modules").is_dir():
        subprocess.run(["npm", "install", "--silent"], cwd=VALIDATE, check=True, timeout=600)
    proc = subprocess.run([sys.executable, "deploy/kubernetes/validate.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpu: " in proc.stdout and "gpu: " in proc.stdout


def test_scaled_object_queries_name_exported_metrics():
    import yaml

    from tokenmill.server.metrics import ServerMetrics

    text = (ROOT / "deploy/kubernetes/base/scaledobject.yaml").read_text()
    exported = ServerMetrics(lambda: None).render()[0].decode()
    for trigger in yaml.safe_load(text)["spec"]["triggers"]:
        metric = trigger["metadata"]["query"].split("(")[-1].split("{")[0]
        assert f"\n{metric} " in exported or exported.startswith(metric), metric
