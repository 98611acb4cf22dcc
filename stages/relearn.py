"""DVC stage `relearn` for one method, or `retrain` (argument); see unlearnops.pipeline.relearn."""
import sys

from unlearnops.cli import run_stage

run_stage("relearn", sys.argv[1:])
