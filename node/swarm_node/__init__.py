"""swarm_node: the model engine and the `swarm-node` daemon that hosts a slice of it.

It needs torch, which the base install leaves out: ``pip install "llama-swarm[node]"``.
"""

import importlib.util

if importlib.util.find_spec("torch") is None:
    raise ImportError('swarm_node needs torch, which the base install leaves out: pip install "llama-swarm[node]"')
