"""Raise or restore the GPU hosts' autoscaling floor around a known peak.

`prescale.py raise`: minReplicas becomes 120% of the hosts running now
(rounded up, at least the usual floor, at most maxReplicas); the usual floor
is kept in an annotation. `prescale.py restore`: minReplicas goes back to
it. Run by the CronJobs in cronjobs.yaml an hour before and after a peak;
the HPA still scales above the floor on its metrics. Talks to the API
server with the pod's service account, standard library only.
"""

import json
import math
import os
import ssl
import sys
import urllib.request

ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
BASELINE = "breakwater/baseline-min-replicas"


def call(method, path, body=None):
    with open(f"{ACCOUNT}/token") as f:
        token = f.read().strip()
    request = urllib.request.Request(
        f"https://kubernetes.default.svc{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/merge-patch+json",
            "Accept": "application/json",
        },
    )
    context = ssl.create_default_context(cafile=f"{ACCOUNT}/ca.crt")
    with urllib.request.urlopen(request, context=context, timeout=30) as answer:
        return json.load(answer)


def main(mode):
    with open(f"{ACCOUNT}/namespace") as f:
        namespace = f.read().strip()
    name = os.environ.get("HPA", "gpu-host")
    raise_by = float(os.environ.get("RAISE_BY", "0.2"))
    path = f"/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers/{name}"
    hpa = call("GET", path)
    spec, status = hpa["spec"], hpa.get("status", {})
    annotations = hpa["metadata"].get("annotations") or {}
    floor = spec.get("minReplicas", 1)
    if mode == "raise":
        # A second raise (a retried job) keeps the first one's baseline.
        baseline = int(annotations.get(BASELINE, floor))
        running = status.get("currentReplicas", baseline)
        target = min(spec["maxReplicas"], max(baseline, math.ceil(running * (1 + raise_by))))
        patch = {"metadata": {"annotations": {BASELINE: str(baseline)}}, "spec": {"minReplicas": target}}
    elif mode == "restore":
        if BASELINE not in annotations:
            print(f"{name}: not raised, minReplicas stays {floor}")
            return 0
        target = int(annotations[BASELINE])
        patch = {"metadata": {"annotations": {BASELINE: None}}, "spec": {"minReplicas": target}}
    else:
        print("usage: prescale.py raise|restore", file=sys.stderr)
        return 2
    call("PATCH", path, patch)
    print(f"{name}: minReplicas {floor} -> {target} ({mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
