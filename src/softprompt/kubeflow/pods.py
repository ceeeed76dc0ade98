"""What a pipeline step (or a Ray driver it launched) needs from the Kubernetes pod it runs in: the
namespace, S3 credentials from the namespace's Secret when the pod's environment has none, and the
Ray clusters' token."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from softprompt.errors import SoftpromptError

S3_SECRET = os.environ.get("SOFTPROMPT_S3_SECRET", "softprompt-s3")
"""Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (infra/rbac allows `get` on it)."""
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RAY_AUTH_SECRET = "softprompt-ray-auth"
"""Kubernetes Secret with the Ray clusters' token (RAY_AUTH_MODE=token; infra/README.md creates it)."""
RAY_AUTH_SECRET_KEY = "auth_token"
"""Its key: the one KubeRay's `authOptions.secretName` requires."""


def ensure_s3_credentials(api_client: Any = None) -> None:
    """Inside a Kubernetes pod without AWS credentials in its environment, read them from the
    Secret `softprompt-s3` of the pod's namespace (the pipeline's Role may `get` exactly that).

    KFP gives component pods no secret env without the kfp-kubernetes extension; reading the
    Secret through the API keeps credentials out of the pipeline spec. A failure only warns:
    credentials may also come from the node's or the pod's cloud identity.

    Args:
        api_client: A kubernetes ApiClient (tests); default: the pod's in-cluster credentials.
    """
    if os.environ.get("AWS_ACCESS_KEY_ID") or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return
    try:
        if api_client is None:
            from kubernetes import config

            config.load_incluster_config()
        values = read_secret(S3_SECRET, api_client)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            if values.get(key):
                os.environ[key] = values[key]
    except Exception as exc:  # any failure leaves the default AWS credential chain in charge
        print(f"warning: could not read Secret {S3_SECRET} ({exc}); using the default AWS credential chain", file=sys.stderr)


def pod_namespace() -> str:
    """The namespace this pod runs in (`default` outside a cluster)."""
    path = SA_DIR / "namespace"
    return path.read_text().strip() if path.is_file() else "default"


def ray_auth_headers(api_client: Any = None, *, echo: Callable[[str], None] = print) -> dict[str, str]:
    """The `Authorization` header for a Ray cluster that runs with token authentication.

    The token comes from where Ray itself looks, $RAY_AUTH_TOKEN, else the file named by
    $RAY_AUTH_TOKEN_PATH, and inside a Kubernetes pod (a pipeline step, whose pod KFP gives no
    secret env) from the Secret `softprompt-ray-auth` of the pod's namespace, which the pipeline's
    Role may `get`. Ray's JobSubmissionClient adds the header on its own only when this process has
    RAY_AUTH_MODE=token; an explicit one works either way. No token found: no header (a cluster
    without authentication needs none; one with it answers 401, which Ray's error explains).

    Raises:
        SoftpromptError: $RAY_AUTH_TOKEN_PATH names a file that cannot be read (Ray treats that
            as fatal too rather than falling back).
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    if not token and path:
        try:
            token = Path(path).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SoftpromptError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {exc}") from exc
    if not token and (api_client is not None or os.environ.get("KUBERNETES_SERVICE_HOST")):
        token = _secret_token(api_client, echo)
    return {"Authorization": f"Bearer {token}"} if token else {}


def read_secret(name: str, api_client: Any = None) -> dict[str, str]:
    """The decoded values of Secret `name` in this pod's namespace.

    Args:
        api_client: A kubernetes ApiClient; default: the configuration already loaded.
    """
    import base64

    from kubernetes import client

    secret = client.CoreV1Api(api_client).read_namespaced_secret(name, pod_namespace())
    return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items() if value}


def _secret_token(api_client: Any, echo: Callable[[str], None]) -> str:
    from kubernetes.client.exceptions import ApiException

    namespace = pod_namespace()
    try:
        values = read_secret(RAY_AUTH_SECRET, api_client or in_cluster_client())
    except Exception as exc:  # no API access: a cluster without authentication still works
        why = f"HTTP {exc.status} {exc.reason}" if isinstance(exc, ApiException) else str(exc)
        echo(f"warning: no Ray token: could not read Secret {namespace}/{RAY_AUTH_SECRET} ({why}); "
             "a cluster with token authentication will refuse the job (infra/README.md, section 2)")
        return ""
    return values.get(RAY_AUTH_SECRET_KEY, "").strip()


def in_cluster_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()  # outside a cluster: the current kubectl context
    return client.ApiClient()
