"""The parameter server: owns blocks of named tensors, aggregates pushes, applies the
optimizer, and decides which leading blocks are frozen. It knows nothing of torch modules."""
