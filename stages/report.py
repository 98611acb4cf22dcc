"""DVC stage `report`: see unlearnops.pipeline.report."""
import sys

from unlearnops.stages import run_stage

run_stage("report", sys.argv[1:])
