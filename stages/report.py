"""DVC stage `report`: see unlearnops.pipeline.report."""
import sys

from unlearnops.cli import run_stage

run_stage("report", sys.argv[1:])
