"""`softprompt pipeline submit|schedule|pause|resume|list` against a fake Kubeflow Pipelines API.

No KFP backend runs here: a small HTTP server on 127.0.0.1 plays the KFP v2beta1 REST API (the
endpoints kfp.Client calls), records every request and answers like the real one (ids, 409 on a
duplicate version name). The tests check the paths, methods, query strings, JSON bodies and the
Authorization header that kfp.Client sends for our commands.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from softprompt.cli import main
from softprompt.kubeflow.client import KfpError, validate_cron

API = "/apis/v2beta1"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeKfp:
    """State of the fake KFP API: pipelines, versions, experiments, recurring runs."""

    requests: list[Request] = field(default_factory=list)
    pipelines: dict[str, str] = field(default_factory=dict)  # id -> name
    versions: dict[str, dict[str, str]] = field(default_factory=dict)  # pipeline id -> {name: version id}
    experiments: dict[str, str] = field(default_factory=dict)  # id -> name
    recurring: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> stored body

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests if not r.path.endswith("/healthz")]

    def handle(self, req: Request) -> tuple[int, Any]:
        path, name_filter = req.path, _filter_name(req.query.get("filter"))
        if path == f"{API}/healthz":
            return 200, {"multi_user": False}
        if path == f"{API}/pipelines" and req.method == "GET":
            found = [{"pipeline_id": i, "display_name": n} for i, n in self.pipelines.items() if n == name_filter]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if path == f"{API}/pipelines" and req.method == "POST":
            pid = f"pipe-{len(self.pipelines) + 1}"
            self.pipelines[pid] = req.json()["display_name"]
            return 200, {"pipeline_id": pid, "display_name": self.pipelines[pid]}
        if path == f"{API}/pipelines/upload_version":
            assert b'name="uploadfile"' in req.body and b"pipelineInfo" in req.body, "no pipeline spec uploaded"
            pid, name = req.query["pipelineid"], req.query["name"]
            versions = self.versions.setdefault(pid, {})
            if name in versions:
                return 409, {"code": 6, "message": f"pipeline version {name} already exists"}
            versions[name] = f"ver-{sum(len(v) for v in self.versions.values()) + 1}"
            return 200, {"pipeline_id": pid, "pipeline_version_id": versions[name], "display_name": name}
        if path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            pid = path.split("/")[-2]
            found = [{"pipeline_id": pid, "pipeline_version_id": v, "display_name": n}
                     for n, v in self.versions.get(pid, {}).items() if n == name_filter]
            return 200, {"pipeline_versions": found}
        if path == f"{API}/experiments" and req.method == "GET":
            found = [{"experiment_id": i, "display_name": n} for i, n in self.experiments.items() if n == name_filter]
            return 200, {"experiments": found} if found else {}
        if path == f"{API}/experiments" and req.method == "POST":
            eid = f"exp-{len(self.experiments) + 1}"
            self.experiments[eid] = req.json()["display_name"]
            return 200, {"experiment_id": eid, "display_name": self.experiments[eid]}
        if path == f"{API}/runs" and req.method == "POST":
            return 200, {"run_id": "run-1", "display_name": req.json()["display_name"], "state": "PENDING"}
        if path == f"{API}/recurringruns" and req.method == "GET":
            found = [{"recurring_run_id": i, **b} for i, b in self.recurring.items() if name_filter in (None, b["display_name"])]
            return 200, {"recurringRuns": found, "next_page_token": ""} if found else {}  # sic: camelCase in the KFP API
        if path == f"{API}/recurringruns" and req.method == "POST":
            rid = f"rr-{len(self.recurring) + 1}"
            self.recurring[rid] = req.json()
            return 200, {"recurring_run_id": rid, **req.json()}
        if path.startswith(f"{API}/recurringruns/") and req.method == "POST":
            rid, _, action = path.rsplit("/", 1)[-1].partition(":")
            if rid not in self.recurring:
                return 404, {"code": 5, "message": f"recurring run {rid} not found"}
            self.recurring[rid]["mode"] = "ENABLE" if action == "enable" else "DISABLE"
            return 200, {}
        if path.startswith(f"{API}/recurringruns/") and req.method == "DELETE":
            self.recurring.pop(path.rsplit("/", 1)[-1], None)
            return 200, {}
        return 404, {"message": f"fake KFP has no {req.method} {path}"}


def _filter_name(text: str | None) -> str | None:
    if not text:
        return None
    predicates = json.loads(text)["predicates"]
    assert predicates[0]["operation"] in ("EQUALS", 1) and predicates[0]["key"] == "display_name"  # kfp sends the enum number
    return str(predicates[0]["stringValue"])


@pytest.fixture()
def kfp_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[str, FakeKfp]]:
    """A fake KFP API on 127.0.0.1; kfp.Client's context file and token paths point into tmp_path."""
    import kfp.client.client as kfp_client

    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-sa-token"))
    for name in ("KFP_TOKEN", "KF_PIPELINES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeKfp()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            req = Request(self.command, url.path, {k: v[0] for k, v in parse_qs(url.query).items()},
                          {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
            fake.requests.append(req)
            status, payload = fake.handle(req)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", fake
    finally:
        server.shutdown()
        server.server_close()


def test_submit_uploads_a_new_version_and_starts_a_run(kfp_api: tuple[str, FakeKfp], capsys: pytest.CaptureFixture[str]) -> None:
    host, fake = kfp_api
    code = main(["pipeline", "submit", "--host", host, "--token", "secret-token", "--config", "s3://bucket/configs/nightly.yaml",
                 "--registry", "s3://bucket/registry", "--param", "num_workers=2", "--param", "gpus_per_worker=1",
                 "train.steps=50", "--experiment", "nightly", "--run-name", "nightly test"])
    assert code == 0
    assert fake.calls() == [
        ("GET", f"{API}/pipelines"), ("POST", f"{API}/pipelines"), ("POST", f"{API}/pipelines/upload_version"),
        ("GET", f"{API}/experiments"), ("POST", f"{API}/experiments"), ("POST", f"{API}/runs"),
    ]
    assert all(r.headers.get("authorization") == "Bearer secret-token" for r in fake.requests)
    create_pipeline, upload = fake.requests[2], fake.requests[3]
    assert create_pipeline.json()["display_name"] == "softprompt"
    assert upload.query["pipelineid"] == "pipe-1" and upload.query["name"].startswith("0.2.0-")
    assert fake.requests[5].json()["display_name"] == "nightly"
    run = fake.requests[-1].json()
    assert run["experiment_id"] == "exp-1" and run["display_name"] == "nightly test"
    assert run["pipeline_version_reference"] == {"pipeline_id": "pipe-1", "pipeline_version_id": "ver-1"}
    assert run["service_account"] == "softprompt-pipeline"
    assert run["runtime_config"]["parameters"] == {
        "config_uri": "s3://bucket/configs/nightly.yaml", "registry": "s3://bucket/registry",
        "num_workers": 2, "gpus_per_worker": 1, "overrides": ["train.steps=50"],
    }
    assert "run run-1 started" in capsys.readouterr().out


def test_resubmitting_the_same_spec_reuses_its_version_and_experiment(kfp_api: tuple[str, FakeKfp]) -> None:
    host, fake = kfp_api
    args = ["pipeline", "submit", "--host", host, "--config", "s3://bucket/c.yaml"]
    assert main(args) == 0
    first_version = fake.requests[3].query["name"]
    fake.requests.clear()
    assert main(args) == 0
    assert fake.calls() == [
        ("GET", f"{API}/pipelines"), ("POST", f"{API}/pipelines/upload_version"),  # 409: same spec, same name
        ("GET", f"{API}/pipelines/pipe-1/versions"), ("GET", f"{API}/experiments"), ("POST", f"{API}/runs"),
    ]
    assert fake.requests[2].query["name"] == first_version
    assert "authorization" not in fake.requests[0].headers  # no token, no token file: no auth header
    run = fake.requests[-1].json()
    assert run["pipeline_version_reference"]["pipeline_version_id"] == "ver-1"
    assert run["experiment_id"] == "exp-1"


def test_explicit_version_and_token_file(kfp_api: tuple[str, FakeKfp], tmp_path: Path) -> None:
    host, fake = kfp_api
    token = tmp_path / "token"
    token.write_text("from-file\n")
    assert main(["pipeline", "submit", "--host", host, "--token-file", str(token), "--config", "c.yaml", "--version", "v-test"]) == 0
    upload = next(r for r in fake.requests if r.path.endswith("upload_version"))
    assert upload.query["name"] == "v-test"
    assert {r.headers.get("authorization") for r in fake.requests} == {"Bearer from-file"}


def test_unknown_param_is_an_error_listing_the_valid_ones(kfp_api: tuple[str, FakeKfp], capsys: pytest.CaptureFixture[str]) -> None:
    host, fake = kfp_api
    assert main(["pipeline", "submit", "--host", host, "--config", "c.yaml", "--param", "num_gpus=2"]) == 2
    err = capsys.readouterr().err
    assert "--param 'num_gpus=2'" in err and "gpus_per_worker" in err
    assert fake.requests == []


def test_schedule_creates_a_recurring_run(kfp_api: tuple[str, FakeKfp], capsys: pytest.CaptureFixture[str]) -> None:
    host, fake = kfp_api
    assert main(["pipeline", "schedule", "--host", host, "--config", "s3://b/c.yaml", "--cron", "0  0 3 * * *"]) == 0
    assert fake.calls() == [
        ("GET", f"{API}/recurringruns"), ("GET", f"{API}/pipelines"), ("POST", f"{API}/pipelines"),
        ("POST", f"{API}/pipelines/upload_version"), ("GET", f"{API}/experiments"), ("POST", f"{API}/experiments"),
        ("POST", f"{API}/recurringruns"),
    ]
    body = fake.requests[-1].json()
    assert body["display_name"] == "softprompt-nightly"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert body["mode"] == "ENABLE" and body["no_catchup"] is True and int(body["max_concurrency"]) == 1
    assert body["pipeline_version_reference"] == {"pipeline_id": "pipe-1", "pipeline_version_id": "ver-1"}
    assert body["runtime_config"]["parameters"] == {"config_uri": "s3://b/c.yaml"}
    assert body["service_account"] == "softprompt-pipeline"
    assert "rr-1" in capsys.readouterr().out


def test_schedule_name_clash_needs_replace(kfp_api: tuple[str, FakeKfp], capsys: pytest.CaptureFixture[str]) -> None:
    host, fake = kfp_api
    args = ["pipeline", "schedule", "--host", host, "--config", "c.yaml", "--cron", "0 30 2 * * *", "--name", "nightly"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already exists (rr-1)" in capsys.readouterr().err
    assert main([*args, "--replace"]) == 0
    assert list(fake.recurring) == ["rr-2"]
    assert fake.calls()[-2:] == [("POST", f"{API}/recurringruns"), ("DELETE", f"{API}/recurringruns/rr-1")]


def test_schedule_rejects_five_field_cron_before_calling_kfp(kfp_api: tuple[str, FakeKfp], capsys: pytest.CaptureFixture[str]) -> None:
    host, fake = kfp_api
    assert main(["pipeline", "schedule", "--host", host, "--config", "c.yaml", "--cron", "0 3 * * *"]) == 2
    err = capsys.readouterr().err
    assert "six, seconds first" in err and "did you mean '0 0 3 * * *'?" in err
    assert fake.requests == []


def test_pause_resume_and_list(kfp_api: tuple[str, FakeKfp], capsys: pytest.CaptureFixture[str]) -> None:
    host, fake = kfp_api
    assert main(["pipeline", "schedule", "--host", host, "--config", "c.yaml", "--cron", "0 0 3 * * *"]) == 0
    fake.requests.clear()
    assert main(["pipeline", "pause", "--host", host, "softprompt-nightly"]) == 0
    assert fake.calls() == [("GET", f"{API}/recurringruns"), ("POST", f"{API}/recurringruns/rr-1:disable")]
    assert fake.recurring["rr-1"]["mode"] == "DISABLE"
    assert main(["pipeline", "resume", "--host", host, "rr-1"]) == 0  # by id
    assert fake.calls()[-1] == ("POST", f"{API}/recurringruns/rr-1:enable")
    assert main(["pipeline", "pause", "--host", host, "no-such-schedule"]) == 2
    assert "HTTP 404" in capsys.readouterr().err
    assert main(["pipeline", "list", "--host", host, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"id": "rr-1", "name": "softprompt-nightly", "status": "ENABLE", "cron": "0 0 3 * * *", "version_id": "ver-1"}]


@pytest.mark.parametrize("cron", ["0 0 3 * * *", "0 */15 * * * ?", "0 0 9 ? * MON-FRI", "30 0 0 1,15 JAN-JUN *", "@daily", "@every 6h30m"])
def test_valid_crons(cron: str) -> None:
    assert validate_cron(cron) == cron


@pytest.mark.parametrize(("cron", "message"), [
    ("0 3 * * *", "did you mean '0 0 3 * * *'?"),
    ("0 0 3 * * * *", "has 7 fields"),
    ("", "has 0 fields"),
    ("0 0 24 * * *", "hour field '24' has '24', outside 0-23"),
    ("0 0 3 * 13 *", "month field '13'"),
    ("? 0 3 * * *", "only day-of-month and day-of-week accept"),
    ("0 */0 3 * * *", "positive whole number"),
    ("0 0 3 * * FUNDAY", "not a number or one of SUN"),
    ("@often", "unknown descriptor"),
])
def test_invalid_crons(cron: str, message: str) -> None:
    with pytest.raises(KfpError, match=None) as info:
        validate_cron(cron)
    assert message in str(info.value)
