"""`softprompt pipeline schedule` as a script:

    python pipelines/schedule.py --host http://localhost:8080 --config s3://softprompt-registry/configs/nightly.yaml --cron "0 0 3 * * *"

All options: `python pipelines/schedule.py --help`. The logic is in `softprompt.kubeflow`.
"""

import sys

from softprompt.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pipeline", "schedule", *sys.argv[1:]]))
