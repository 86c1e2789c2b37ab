"""`latentshift fire-rayjob`: one RayJob per CronJob firing, from a suspended template."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.cluster.fire_rayjob import ApiServer, fire, fired_rayjob, firing_name
from pipeline.errors import LatentshiftError

TEMPLATE = {
    "apiVersion": "ray.io/v1", "kind": "RayJob",
    "metadata": {"name": "latentshift-nightly-template", "namespace": "data", "uid": "u-1", "resourceVersion": "7",
                 "labels": {"latentshift.io/job": "scheduled-translate-cronjob"}},
    "spec": {"suspend": True, "entrypoint": "python jobs/translate.py --config /config/scheduled-translate.yaml",
             "rayClusterSpec": {"headGroupSpec": {"template": {}}}},
    "status": {"jobDeploymentStatus": "Suspended"},
}


def test_firing_name_comes_from_the_scheduled_minute_and_fits_kuberay():
    assert firing_name("latentshift-nightly-template", "latentshift-nightly-29388120") == "latentshift-nightly-29388120"
    long = firing_name("a-very-long-template-name-that-goes-on-and-on-template", "x-29388120")
    assert long.endswith("-29388120") and len(long) <= 47 and "--" not in long
    with pytest.raises(LatentshiftError, match="does not end in a number"):
        firing_name("t-template", "manual")


def test_fired_rayjob_runs_the_templates_spec_and_drops_server_fields():
    job = fired_rayjob(TEMPLATE, "latentshift-nightly-29388120")
    assert job["spec"]["suspend"] is False and job["spec"]["entrypoint"] == TEMPLATE["spec"]["entrypoint"]
    assert job["metadata"]["name"] == "latentshift-nightly-29388120"
    assert "uid" not in job["metadata"] and "resourceVersion" not in job["metadata"] and "status" not in job
    assert job["metadata"]["labels"]["latentshift.io/fired-from"] == "latentshift-nightly-template"
    assert TEMPLATE["spec"]["suspend"] is True  # the template is not modified


class FakeApi(BaseHTTPRequestHandler):
    """Just enough of the Kubernetes API: GET one RayJob, POST a RayJob (409 if it exists)."""

    store: dict[str, dict] = {}
    seen_auth: list[str] = []

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self.seen_auth.append(self.headers.get("Authorization", ""))
        name = self.path.rsplit("/", 1)[-1]
        if name in self.store:
            self._reply(200, self.store[name])
        else:
            self._reply(404, {"message": f'rayjobs.ray.io "{name}" not found'})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/apis/ray.io/v1/namespaces/data/rayjobs"
        name = body["metadata"]["name"]
        if name in self.store:
            self._reply(409, {"message": f'rayjobs.ray.io "{name}" already exists'})
        else:
            self.store[name] = body
            self._reply(201, body)

    def log_message(self, *args):
        pass


@pytest.fixture
def api_server():
    FakeApi.store = {"latentshift-nightly-template": TEMPLATE}
    FakeApi.seen_auth = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_one_rayjob_per_firing_even_when_the_pod_is_retried(api_server):
    api = ApiServer(api_server, token="sa-token", ca_file=None)
    out = io.StringIO()
    assert fire(api, "data", "latentshift-nightly-template", "latentshift-nightly-29388120", out) == 0
    assert fire(api, "data", "latentshift-nightly-template", "latentshift-nightly-29388120", out) == 0  # retried pod
    assert fire(api, "data", "latentshift-nightly-template", "latentshift-nightly-29389560", out) == 0  # next day
    created = sorted(k for k in FakeApi.store if k != "latentshift-nightly-template")
    assert created == ["latentshift-nightly-29388120", "latentshift-nightly-29389560"]
    assert "already created it" in out.getvalue()
    assert FakeApi.seen_auth and all(a == "Bearer sa-token" for a in FakeApi.seen_auth)
    assert "sa-token" not in out.getvalue()


def test_a_missing_template_names_the_fix(api_server):
    api = ApiServer(api_server, token=None, ca_file=None)
    with pytest.raises(LatentshiftError, match=r"template RayJob data/nope .*HTTP 404.*is it applied"):
        fire(api, "data", "nope", "x-1")


def test_outside_a_cluster_the_error_says_so(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(LatentshiftError, match="runs inside a Kubernetes pod"):
        ApiServer.in_cluster()
