"""DVC stage `evaluate_retrain`: retrain's membership inference and relearning attack; see unlearnops.pipeline.evaluate_retrain."""
import sys

from unlearnops.cli import run_stage

run_stage("evaluate_retrain", sys.argv[1:])
