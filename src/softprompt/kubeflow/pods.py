"""What a pipeline step (or a Ray driver it launched) needs from the Kubernetes pod it runs in: the
namespace, and S3 credentials from the namespace's Secret when the pod's environment has none."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

S3_SECRET = os.environ.get("SOFTPROMPT_S3_SECRET", "softprompt-s3")
"""Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (infra/rbac allows `get` on it)."""
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


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
        import base64

        from kubernetes import client, config

        if api_client is None:
            config.load_incluster_config()
        secret = client.CoreV1Api(api_client).read_namespaced_secret(S3_SECRET, pod_namespace())
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            if (secret.data or {}).get(key):
                os.environ[key] = base64.b64decode(secret.data[key]).decode()
    except Exception as exc:  # any failure leaves the default AWS credential chain in charge
        print(f"warning: could not read Secret {S3_SECRET} ({exc}); using the default AWS credential chain", file=sys.stderr)


def pod_namespace() -> str:
    """The namespace this pod runs in (`default` outside a cluster)."""
    path = SA_DIR / "namespace"
    return path.read_text().strip() if path.is_file() else "default"
