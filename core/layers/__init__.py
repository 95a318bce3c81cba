"""Building blocks shared by model plugins (norms, rotary, linear, attention, logits)."""
