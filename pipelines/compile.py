"""`softprompt pipeline compile` as a script:

    python pipelines/compile.py --output softprompt_pipeline.yaml [--image REGISTRY/softprompt:0.2.0]

All options: `python pipelines/compile.py --help`. The logic is in `softprompt.kubeflow`.
"""

import sys

from softprompt.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pipeline", "compile", *sys.argv[1:]]))
