"""DVC stage `unlearn@<setting>-<method>`: `stages/unlearn.py <method> --setting S [--condense blend]`: unlearnops.pipeline.unlearn, then evaluate."""
import sys

from unlearnops.stages import run_stage

run_stage("unlearn", sys.argv[1:])
