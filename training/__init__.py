"""The PyTorch training subsystem: data, models, attacks, the training recipe and evaluation."""
