"""Output layers of ItemLM (full softmax, two-level softmax) and the item clusters the two-level
head is built on. Imports itemgen.data and itemgen.core."""
