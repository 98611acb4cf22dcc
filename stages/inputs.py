"""DVC stage `inputs@<setting>`: see unlearnops.pipeline.record_inputs."""
import sys

from unlearnops.cli import run_stage

run_stage("inputs", sys.argv[1:])
