"""Evaluate: the tuned prompt against zero-shot and few-shot baselines (Metrics, ClassificationMetrics, HTML).

The component is defined in `softprompt.kubeflow.components`, inside the installed package, so
`softprompt pipeline compile` works wherever softprompt is installed; this file is its place in the
repository's layout. `python components/evaluate.py [OUTPUT]` writes it as a standalone component
YAML (default evaluate.yaml) for `kfp.components.load_component_from_file`.
"""

import sys

from softprompt.kubeflow.components import evaluate

__all__ = ["evaluate"]

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(evaluate, sys.argv[1] if len(sys.argv) > 1 else "evaluate.yaml")
