"""swarm_node: the model engine and the `swarm-node` daemon that hosts a slice of it."""
