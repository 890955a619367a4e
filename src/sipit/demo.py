"""The built-in walkthrough: capture three real sentences at a middle layer and invert them."""

from __future__ import annotations

import logging
import time

from sipit import lm as lm_mod
from sipit.capture import capture
from sipit.invert import invert

log = logging.getLogger(__name__)

SENTENCES = (
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "My password is hunter2 and my bank PIN is 4096.",
)


def run(model: str = "shakespeare-llama", layer: str = "2", sentences=SENTENCES,
        progress=None) -> list[dict]:
    """Capture and invert each sentence; rows with prompt, recovered text, exact match, time."""
    lm = lm_mod.load(model)
    rows = []
    for i, sentence in enumerate(sentences):
        started = time.perf_counter()
        states = capture(lm, sentence, layer=layer)
        result = invert(states, model=lm)
        rows.append(dict(prompt=sentence, recovered=result.text,
                         exact=result.token_ids == lm.encode(sentence),
                         tokens=len(result.token_ids),
                         seconds=time.perf_counter() - started))
        if progress is not None:
            progress(i + 1, len(sentences))
    return rows
