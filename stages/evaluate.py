"""DVC stage `evaluate` for one method (argument: the method's registry name); see unlearnops.pipeline.evaluate."""
import sys

from unlearnops.cli import run_stage

run_stage("evaluate", sys.argv[1:])
