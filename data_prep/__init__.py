"""Corpus -> tokenizer -> K-aligned packed MDS shards."""
