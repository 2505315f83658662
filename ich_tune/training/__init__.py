"""Training one model: the loop (loop), one optimizer step (step), a model's probabilities over batches
(inference), loss, optimizer and learning-rate schedule (optim), the saved-model format (checkpoint), and
where a model runs (device)."""
