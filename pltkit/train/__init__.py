"""Training of pltkit's embedded default model: data, tokenizer and FIM examples."""
