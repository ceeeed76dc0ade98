"""Validate: fetch the config, apply the run's parameters, check it and its data, write the resolved config.

The component is defined in `softprompt.kubeflow.components`, inside the installed package, so
`softprompt pipeline compile` works wherever softprompt is installed; this file is its place in the
repository's layout. `python components/validate.py [OUTPUT]` writes it as a standalone component
YAML (default validate.yaml) for `kfp.components.load_component_from_file`.
"""

import sys

from softprompt.kubeflow.components import validate

__all__ = ["validate"]

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(validate, sys.argv[1] if len(sys.argv) > 1 else "validate.yaml")
