"""The launcher: model/dataset/mode/preset registries, Megatron argv, torchrun/Slurm, recorded runs.

Importing it is cheap (no torch, no megatron); Megatron is imported in child processes only.
"""

from __future__ import annotations
