#!/usr/bin/env python3
"""validate-manifests.py K8S_VERSION FILE...: every object of rendered Kubernetes
manifests, checked against the Kubernetes schemas (kubernetes-validate, --strict:
unknown fields are errors). ServiceMonitor is a Prometheus Operator CRD, not in those
schemas: it is checked against the fields of its CRD that the manifests use (below),
strictly too. Exits 1 naming each object that fails."""
import subprocess
import sys
import tempfile

import jsonschema
import yaml

# The monitoring.coreos.com/v1 ServiceMonitor fields used here, as its CRD defines them.
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": {"type": "object"}},
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "scheme": {"enum": ["http", "https"]},
                        },
                        "required": ["port"],
                    },
                },
            },
        },
    },
}


def main():
    version, files = sys.argv[1], sys.argv[2:]
    failed = 0
    for path in files:
        docs = [d for d in yaml.safe_load_all(open(path)) if d]
        core = [d for d in docs if d.get("kind") != "ServiceMonitor"]
        for d in docs:
            if d.get("kind") == "ServiceMonitor":
                try:
                    jsonschema.validate(d, SERVICE_MONITOR)
                    print(f"ok   {path}: servicemonitor/{d['metadata']['name']} (CRD fields)")
                except jsonschema.ValidationError as e:
                    failed += 1
                    print(f"FAIL {path}: servicemonitor/{d['metadata'].get('name')}: {e.message}")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as tmp:
            yaml.safe_dump_all(core, tmp)
            tmp.flush()
            r = subprocess.run(["kubernetes-validate", "-k", version, "--strict", tmp.name],
                               capture_output=True, text=True)
            lines = (r.stdout + r.stderr).splitlines()
            for line in lines:
                print(("ok   " if line.startswith("INFO") else "     ") + line.replace(tmp.name, path))
            # The command exits 0 for a kind it has no schema for (it only warns), so
            # anything but a pass counts.
            if r.returncode != 0 or any(not l.startswith("INFO") for l in lines if l.strip()):
                failed += 1
        print(f"{path}: {len(docs)} objects")
    sys.exit(1 if failed else 0)


main()
