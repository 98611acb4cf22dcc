"""DVC stage `retrain@<setting>`: unlearnops.pipeline.retrain, then evaluate_retrain (retrain's MIA and relearning attack)."""
import sys

from unlearnops.stages import run_stage

run_stage("retrain", sys.argv[1:])
