"""DVC stage `prepare@<setting>`: see unlearnops.pipeline.prepare."""
import sys

from unlearnops.cli import run_stage

run_stage("prepare", sys.argv[1:])
