"""DVC stage `retrain`: see unlearnops.pipeline.retrain."""
import sys

from unlearnops.cli import run_stage

run_stage("retrain", sys.argv[1:])
