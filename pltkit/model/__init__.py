"""The PyTorch reference: config, model, checkpoint I/O and tokenizer."""
