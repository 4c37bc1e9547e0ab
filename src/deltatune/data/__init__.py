"""Data: files become rows, rows become token examples in a task format, examples become batches."""
