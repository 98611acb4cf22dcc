"""DVC stage `split@<dataset>`: see unlearnops.pipeline.split."""
import sys

from unlearnops.stages import run_stage

run_stage("split", sys.argv[1:])
