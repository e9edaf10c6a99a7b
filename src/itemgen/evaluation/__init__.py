"""Ranking metrics, full-catalog evaluation of a model (or of a top-k decoder), and the report
over every benchmark result. Imports itemgen.topk and below."""
