"""Test-session settings: one intra-op thread per worker (tiny r x r kernels are dominated by
thread start-up; `make test` runs two xdist workers on two cores instead)."""

import torch

torch.set_num_threads(1)
