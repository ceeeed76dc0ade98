"""Promote: make the published version the champion if the registry's gate agrees.

The component is defined in `softprompt.kubeflow.components`, inside the installed package, so
`softprompt pipeline compile` works wherever softprompt is installed; this file is its place in the
repository's layout. `python components/promote.py [OUTPUT]` writes it as a standalone component
YAML (default promote.yaml) for `kfp.components.load_component_from_file`.
"""

import sys

from softprompt.kubeflow.components import promote

__all__ = ["promote"]

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(promote, sys.argv[1] if len(sys.argv) > 1 else "promote.yaml")
