"""Data: the prepared dataset and its leave-one-out split, loaders of public formats, the synthetic
catalog, and the prompts that interleave text tokens and item slots. Imports only itemgen.core."""
