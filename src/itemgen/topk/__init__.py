"""Top-k decoders behind one interface, ``topk(query, k, exclude) -> (scores, ids)``: exact (the
reference), structure (two-level heads), ANN (FAISS), L2D and beam search; ``factory.make_decoder``
picks one by name. Imports itemgen.models and below."""
