#!/bin/bash
# Write (and with submit=true, submit) the sbatch script for one recipe; see README.md here.
exec nemo-rl-fp16 launch slurm "$@"
