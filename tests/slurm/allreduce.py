"""Launcher check run by torchrun under slurm/train.sbatch: a gloo all_reduce over every rank.

Prints one line per rank: `rank R/W node NODE sum S`, where NODE is the emulated Slurm node the
rank runs on and S = 1 + 2 + ... + W.
"""
import os

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)
print(f"rank {rank}/{world} node {os.environ['SLURMD_NODENAME']} sum {total.item():g}", flush=True)
dist.destroy_process_group()
