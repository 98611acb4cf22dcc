"""DVC stage `train_target@<dataset>`: see unlearnops.pipeline.train_target."""
import sys

from unlearnops.stages import run_stage

run_stage("train_target", sys.argv[1:])
