"""Render every overlay and validate each resource against its schema (CI runs this).

Standard kinds are checked with kubernetes-validate (the Kubernetes OpenAPI schemas,
strict: unknown fields are errors); the KEDA ScaledObject and the Prometheus-operator
ServiceMonitor against their CRD schemas (npm packages in validate/, run with node).

    python deploy/kubernetes/validate.py          # needs kubectl, node (npm install in validate/)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
K8S_VERSION = "1.30.0"
CRD_KINDS = {"ScaledObject", "ServiceMonitor"}


def render(overlay: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], check=True,
                         capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def validate(overlay: Path) -> list[str]:
    errors = []
    docs = render(overlay)
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{overlay.name}: {doc['kind']}/{doc['metadata']['name']}: {exc}")
    crds = [doc for doc in docs if doc["kind"] in CRD_KINDS]
    proc = subprocess.run(["node", str(HERE / "validate" / "validate.mjs")],
                          input=json.dumps(crds), capture_output=True, text=True,
                          cwd=HERE / "validate")
    if proc.returncode:
        errors.append(f"{overlay.name}: {proc.stderr.strip() or proc.stdout.strip()}")
    kinds = sorted({doc["kind"] for doc in docs})
    print(f"{overlay.name}: {len(docs)} resources ({', '.join(kinds)})")
    return errors


def main() -> int:
    errors = []
    for overlay in sorted((HERE / "overlays").iterdir()):
        errors += validate(overlay)
    for error in errors:
        print("INVALID", error)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
