"""The foundation every layer may import: the typed config (and the model names it accepts) and
atomic file writes. Imports nothing from itemgen."""
