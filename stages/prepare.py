"""DVC stage `prepare@<setting>`: see unlearnops.pipeline.prepare."""
import sys

from unlearnops.stages import run_stage

run_stage("prepare", sys.argv[1:])
