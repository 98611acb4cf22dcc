"""DVC stage `ulira@<setting>`: `stages/ulira.py <setting>`: unlearnops.pipeline.ulira (U-LiRA for every method and retrain)."""
import sys

from unlearnops.stages import run_stage

run_stage("ulira", sys.argv[1:])
