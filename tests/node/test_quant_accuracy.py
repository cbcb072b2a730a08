"""SmolLM2 Q4_1 kept quantized, as a node runs it by default (int4 kernels in bfloat16,
float32 activations), against transformers on the dequantized weights: teacher-forced
next-token distributions over 256 positions of 3 texts.

Measured here: top-1 99.35% (5 of 768 positions), mean KL 2.9e-4 (thirty times under
its 1e-2 bound). The weights are exact; what flips near-tied argmaxes is bfloat16
rounding of the kernels' inputs, scales and outputs. The LM head recomputes each
position's top 16 logits in float32 from the file's exact scales (97.5% -> 98.57%), and
the q/k/v and gate/up matrices run the rounding spread (engine.quant: three scaled copies
of each input in one kernel call, summed in float32; 98.57% -> 99.35%, the same as on
all four layer matrices; docs/engine.md). The bounds are the issue's: the margin over 99% is
two positions, so another CPU's kernel may land a flip or two apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import SeqChunk

POSITIONS = 256

TEXTS = [
    # prose
    "The history of the printing press begins long before Gutenberg. Craftsmen in China carved whole pages into "
    "wooden blocks, inked them and pressed paper onto the wood, and by the eleventh century Bi Sheng had made movable "
    "type from baked clay. In Korea, metal type was cast two centuries before it appeared in Europe. What changed in "
    "Mainz around 1450 was a combination of inventions: a hand mould that cast letters of exactly the same height, an "
    "oil-based ink that clung to metal, and a screw press adapted from the wine makers of the Rhine valley. Together "
    "they turned printing from a slow art into an industry. Within fifty years, presses were working in more than two "
    "hundred European cities, and millions of books had been printed. Prices fell, literacy spread, and scholars could "
    "compare identical copies of a text for the first time, which changed how knowledge itself was checked, argued "
    "about and passed on. Religious reformers, merchants and scientists all learned to use the new machines, and "
    "governments soon learned to fear them. Censors drew up lists of forbidden titles, printers moved across borders "
    "to escape them, and pamphlets crossed the same borders in barrels of wine and bales of cloth. By 1600 the book "
    "trade had its own fairs, its own credit networks and its own quarrels about who owned a text, quarrels that would "
    "one day become the law of copyright. Newspapers followed in the next century, first as weekly sheets of foreign "
    "news and then as daily papers read aloud in coffee houses.",
    # code
    "import heapq\nfrom dataclasses import dataclass, field\n\n\n@dataclass(order=True)\nclass Task:\n    priority: int\n"
    "    name: str = field(compare=False)\n\n\nclass Scheduler:\n    \"\"\"Run tasks by priority, lowest number first.\"\"\"\n\n"
    "    def __init__(self) -> None:\n        self._queue: list[Task] = []\n        self._done: set[str] = set()\n\n"
    "    def add(self, name: str, priority: int) -> None:\n        if name in self._done:\n"
    "            raise ValueError(f\"task {name} already ran\")\n        heapq.heappush(self._queue, Task(priority, name))\n\n"
    "    def run_next(self) -> str | None:\n        if not self._queue:\n            return None\n"
    "        task = heapq.heappop(self._queue)\n        self._done.add(task.name)\n        return task.name\n\n"
    "    def run_all(self) -> list[str]:\n        order = []\n        while (name := self.run_next()) is not None:\n"
    "            order.append(name)\n        return order\n\n\ndef main() -> None:\n    s = Scheduler()\n"
    "    for i, name in enumerate([\"build\", \"test\", \"lint\", \"deploy\", \"notify\"]):\n        s.add(name, (i * 7) % 5)\n"
    "    print(s.run_all())\n\n\nif __name__ == \"__main__\":\n    main()\n",
    # a chat in the model's template
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nI want to start running in the mornings but I always give up after a week. How do I make it stick?"
    "<|im_end|>\n<|im_start|>assistant\nBuilding a habit is mostly about making the first steps easy and the routine "
    "automatic. Start small: run for ten minutes, three mornings a week, at the same time each day. Put your shoes and "
    "clothes next to the bed the night before so there is nothing to decide when the alarm rings. Keep a simple log on "
    "paper or in an app, because seeing a chain of completed days is motivating. Go slowly enough that you could still "
    "talk while running; most beginners quit because every run feels hard. After a month, add five minutes to one run "
    "each week. Find a friend or a local group if you like company, and plan what you will do on rainy days.<|im_end|>\n"
    "<|im_start|>user\nWhat should I eat before a run that early?<|im_end|>\n<|im_start|>assistant\nFor a short, easy run "
    "you do not need much: a glass of water and something light such as half a banana or a slice of toast with honey "
    "about twenty to thirty minutes before you go out. Avoid heavy, fatty or very fibrous food, which can upset your "
    "stomach while you move.",
]


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


def test_quantized_smollm2_agrees_with_transformers(default_model: Path, default_reference: Any, default_tokenizer: Any) -> None:
    ours = load_slice(default_model, 0, 30, dtype=torch.float32, weights="gguf", kernel_dtype=torch.bfloat16)
    agree, kls = [], []
    for text in TEXTS:
        ids = torch.tensor(default_tokenizer(text)["input_ids"][:POSITIONS])
        assert len(ids) == POSITIONS, len(ids)
        got = ours(ids, [SeqChunk(ours.new_cache(POSITIONS), 0, POSITIONS)], all_logits=True)  # [T, V]
        with torch.no_grad():
            ref = default_reference(ids[None]).logits[0]
        p, q = _log_probs(ref), _log_probs(got)
        agree.append((ref.argmax(-1) == got.argmax(-1)).float())
        kls.append((p.exp() * (p - q)).sum(-1))
    top1 = float(torch.cat(agree).mean())
    kl = float(torch.cat(kls).mean())
    assert top1 >= 0.99, (top1, kl)
    assert kl <= 1e-2, (top1, kl)
