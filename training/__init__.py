"""Offline training side of Fable: data preparation, the trainer and experiments."""

import os

# PyTorch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when
# THP_MEM_ALLOC_ENABLE is set (its CPU tuning guides recommend it). A training step
# allocates logits-sized tensors afresh every time, and each 4 KB page of them faults on
# first touch: with a 6,631-word output layer this made the word LSTM's step 4-7 % slower
# on an AMD Zen 4 guest (on a Xeon guest the difference was within the noise;
# benchmarks/README.md). torch reads the variable at its first allocation, so it is set
# before any: importing this package is the first thing every training entry point does.
# A value set by the user (0 turns it off) wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
