"""`softprompt pipeline submit` as a script:

    python pipelines/submit.py --host http://localhost:8080 --config s3://softprompt-registry/configs/nightly.yaml

All options: `python pipelines/submit.py --help`. The logic is in `softprompt.kubeflow`.
"""

import sys

from softprompt.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pipeline", "submit", *sys.argv[1:]]))
