"""The WAN test bed: namespaces, delayed links, a swarm across them (docs/wan.md)."""
