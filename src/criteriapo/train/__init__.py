"""Training: one loop, tasks that plug into it (SFT, DPO), optimizer and schedule."""
