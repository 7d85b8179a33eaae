"""Training data: synthetic verifiable tasks, user corpora, tokenized memory-mapped shards."""
