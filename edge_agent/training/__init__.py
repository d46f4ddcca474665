"""Confidential training on the edge (docs/training.md).

Datasets stay on the premises: they are registered here (schema, row count, digest, column
classes) and never copied. A training job is decided under the policy for purpose "training",
its dataset transformed row by row (columns dropped or pseudonymised), cut into chunks sealed
under a job key that only the chosen, verified enclave can unwrap, spooled encrypted in a bounded
outbox, and uploaded through the broker with resume. The enclave trains and returns a sealed
model artifact and a signed receipt, which the edge verifies and records.
"""
