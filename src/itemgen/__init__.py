"""itemgen: LLM-based sequential recommendation where every catalog item is one token."""

__version__ = "0.1.0"
