"""DVC stage `evaluate` for one method: `stages/evaluate.py <method> [--condense blend]`; see unlearnops.pipeline.evaluate."""
import sys

from unlearnops.cli import run_stage

run_stage("evaluate", sys.argv[1:])
