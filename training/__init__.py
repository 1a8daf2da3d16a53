"""Offline training side of Fable: data preparation, the trainer and experiments."""

import os

# With THP_MEM_ALLOC_ENABLE set, PyTorch's CPU allocator puts tensors of 2 MB and more on
# transparent huge pages: the logits-sized tensors a step allocates afresh fault far fewer
# pages on first touch (benchmarks/README.md, word-LSTM section). torch reads it at its first
# allocation, and importing this package comes before any. A value the user set (0: off) wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
