"""The training client: models split into blocks, data shards, and the step loop that pulls,
computes and pushes through the parameter server."""
