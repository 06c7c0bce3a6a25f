"""The retrieval database: chunks, BERT embeddings, faiss index, precomputed neighbours."""
