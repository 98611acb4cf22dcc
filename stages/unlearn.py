"""DVC stage `unlearn` for one method (argument: the method's registry name); see unlearnops.pipeline.unlearn."""
import sys

from unlearnops.cli import run_stage

run_stage("unlearn", sys.argv[1:])
