"""Losses: log-probabilities of completions, the DPO family, SFT."""
