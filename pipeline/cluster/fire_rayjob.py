"""``latentshift fire-rayjob``: one firing of a scheduled job on clusters without RayCronJob.

A plain Kubernetes CronJob runs this in a pod. It reads a suspended template RayJob, and creates
a copy that runs, named after the firing (the CronJob's Job name ends in the scheduled time in
minutes). A retried pod of the same firing computes the same name, gets 409 AlreadyExists and
creates nothing: one RayJob per firing. It talks to the API server with the pod's service
account (stdlib HTTP only; the image needs no kubectl).
"""

from __future__ import annotations

import copy
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import LatentshiftError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RAYJOBS = "/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
MAX_NAME = 47  # KubeRay derives RayCluster and Service names from the RayJob's; keep room for its suffixes


def firing_name(template_name: str, firing: str) -> str:
    """``<template name without -template>-<firing id>``; the id is the trailing number of the Job name."""
    base = template_name.removesuffix("-template")
    match = re.search(r"(\d+)$", firing)
    if not match:
        raise LatentshiftError(
            f"FIRING={firing!r} does not end in a number; the CronJob passes its Job's name "
            "(metadata.labels['job-name'], e.g. latentshift-nightly-29388120)"
        )
    suffix = match.group(1)
    return f"{base[: MAX_NAME - len(suffix) - 1].rstrip('-')}-{suffix}"


def fired_rayjob(template: dict, firing: str) -> dict:
    """The RayJob one firing creates: the template's spec, not suspended, under the firing's name."""
    meta = template["metadata"]
    spec = copy.deepcopy(template["spec"])
    spec["suspend"] = False
    labels = {**meta.get("labels", {}), "latentshift.io/fired-from": meta["name"]}
    return {
        "apiVersion": template.get("apiVersion", "ray.io/v1"),
        "kind": "RayJob",
        "metadata": {"name": firing_name(meta["name"], firing), "namespace": meta.get("namespace"), "labels": labels},
        "spec": spec,
    }


class ApiServer:
    """The few Kubernetes API calls a firing needs, authenticated as the pod's service account."""

    def __init__(self, url: str, token: str | None, ca_file: str | None):
        self.url = url.rstrip("/")
        self.token = token
        self.context = ssl.create_default_context(cafile=ca_file) if url.startswith("https") else None

    @classmethod
    def in_cluster(cls) -> ApiServer:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (SERVICE_ACCOUNT / "token").is_file():
            raise LatentshiftError(
                "fire-rayjob runs inside a Kubernetes pod (it uses the pod's service account); "
                "outside a cluster pass --api-server URL and set KUBE_TOKEN"
            )
        return cls(f"https://{host}:{port}", (SERVICE_ACCOUNT / "token").read_text().strip(),
                   str(SERVICE_ACCOUNT / "ca.crt"))

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.context) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            try:
                detail = json.loads(err.read() or b"{}")
            except ValueError:
                detail = {}
            return err.code, detail


def fire(api: ApiServer, namespace: str, template_name: str, firing: str, out=sys.stdout) -> int:
    """Create this firing's RayJob from the template; 0 if created or already created by this firing."""
    collection = RAYJOBS.format(namespace=namespace)
    status, template = api.request("GET", f"{collection}/{template_name}")
    if status != 200:
        raise LatentshiftError(
            f"cannot read the template RayJob {namespace}/{template_name} (HTTP {status}: "
            f"{template.get('message', 'no message')}); is it applied, and may this service account get rayjobs?"
        )
    job = fired_rayjob(template, firing)
    job["metadata"]["namespace"] = namespace
    status, created = api.request("POST", collection, job)
    name = job["metadata"]["name"]
    if status in (200, 201):
        out.write(f"created RayJob {namespace}/{name} from {template_name}\n")
        return 0
    if status == 409:
        out.write(f"RayJob {namespace}/{name} exists: this firing already created it; nothing to do\n")
        return 0
    raise LatentshiftError(f"creating RayJob {namespace}/{name} failed (HTTP {status}: "
                           f"{created.get('message', 'no message')})")


def main(template: str, namespace: str | None, firing: str | None, api_server: str | None) -> int:
    firing = firing or os.environ.get("FIRING")
    if not firing:
        raise LatentshiftError("no firing id: set FIRING (the CronJob passes its Job's name) or pass --firing")
    if api_server:
        api = ApiServer(api_server, os.environ.get("KUBE_TOKEN"), os.environ.get("KUBE_CA_FILE"))
    else:
        api = ApiServer.in_cluster()
    if not namespace:
        ns_file = SERVICE_ACCOUNT / "namespace"
        namespace = ns_file.read_text().strip() if ns_file.is_file() else "default"
    return fire(api, namespace, template, firing)
