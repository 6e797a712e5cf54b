import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# The test problems are tiny: a second intra-op thread only adds synchronisation overhead, and on a
# loaded 2-core runner it makes small ops an order of magnitude slower.
torch.set_num_threads(1)
