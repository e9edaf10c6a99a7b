import torch

# The test models are tiny: one thread is as fast as two for them, and parallel test processes
# (the Accelerate test, server subprocesses, developers' runs) then do not oversubscribe the cores.
torch.set_num_threads(1)
