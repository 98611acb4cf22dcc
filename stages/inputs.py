"""DVC stage `inputs@<setting>`: see unlearnops.pipeline.record_inputs."""
import sys

from unlearnops.stages import run_stage

run_stage("inputs", sys.argv[1:])
