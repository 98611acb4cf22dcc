"""DVC stage `relearn_retrain`: `stages/relearn.py retrain` (any method name works too); see unlearnops.pipeline.relearn."""
import sys

from unlearnops.cli import run_stage

run_stage("relearn", sys.argv[1:])
