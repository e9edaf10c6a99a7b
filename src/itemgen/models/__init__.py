"""Models: the one ``Recommender`` interface, every model behind it (ItemLM, SASRec, BERT4Rec,
GRU4Rec, the title and semantic-ID baselines), the name -> model registry and checkpoints.
Imports itemgen.heads, itemgen.data and itemgen.core."""
