"""DVC stage `unlearn` for one method: `stages/unlearn.py <method> [--condense blend]`; see unlearnops.pipeline.unlearn."""
import sys

from unlearnops.cli import run_stage

run_stage("unlearn", sys.argv[1:])
