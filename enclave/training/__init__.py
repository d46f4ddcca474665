"""Confidential training inside the enclave (docs/training.md): job envelopes, sealed chunk
upload with acks, training with scikit-learn (or on LLM embeddings), sealed model artifacts,
signed training receipts, and scoring with a sealed artifact.

scikit-learn, pandas and numpy are imported only when a job trains or scores, so an enclave
without the ``train`` extra starts and serves inference as before and refuses training clearly.
"""
