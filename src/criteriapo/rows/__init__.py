"""How sequences become the rows of a batch: padded or packed, with the masks and label indices
the log-prob function reads. Below both the losses and the training loop."""
