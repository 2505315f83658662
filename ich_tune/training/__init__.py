"""Training one model: the loop (loop), loss, optimizer and learning-rate schedule (optim), the saved-model
format (checkpoint), and where a model runs (device)."""
