"""Ingest: read, check, split and tokenize the data (a Dataset).

The component is defined in `softprompt.kubeflow.components`, inside the installed package, so
`softprompt pipeline compile` works wherever softprompt is installed; this file is its place in the
repository's layout. `python components/ingest.py [OUTPUT]` writes it as a standalone component
YAML (default ingest.yaml) for `kfp.components.load_component_from_file`.
"""

import sys

from softprompt.kubeflow.components import ingest

__all__ = ["ingest"]

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(ingest, sys.argv[1] if len(sys.argv) > 1 else "ingest.yaml")
