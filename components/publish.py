"""Publish: push the evaluated prompt to the registry as an immutable version.

The component is defined in `softprompt.kubeflow.components`, inside the installed package, so
`softprompt pipeline compile` works wherever softprompt is installed; this file is its place in the
repository's layout. `python components/publish.py [OUTPUT]` writes it as a standalone component
YAML (default publish.yaml) for `kfp.components.load_component_from_file`.
"""

import sys

from softprompt.kubeflow.components import publish

__all__ = ["publish"]

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(publish, sys.argv[1] if len(sys.argv) > 1 else "publish.yaml")
