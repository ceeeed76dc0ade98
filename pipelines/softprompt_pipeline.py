"""The softprompt pipeline: validate → ingest → tune (Ray) → evaluate → publish → promote if it
beats its baselines.

The `@dsl.pipeline` is defined in `softprompt.kubeflow.pipeline`, inside the installed package, so
that `softprompt pipeline compile|run|submit|schedule` work wherever softprompt is installed.
`python pipelines/softprompt_pipeline.py [OUTPUT]` compiles it (default softprompt_pipeline.yaml).
"""

import sys

from softprompt.kubeflow.pipeline import PipelineOutputs, compile_pipeline, softprompt_pipeline

__all__ = ["PipelineOutputs", "compile_pipeline", "softprompt_pipeline"]

if __name__ == "__main__":
    print(compile_pipeline(sys.argv[1] if len(sys.argv) > 1 else "softprompt_pipeline.yaml"))
