"""Training: the loop that trains whatever requires grad, with its optimizer, losses, checkpoints, run directory, processes and evaluation."""
