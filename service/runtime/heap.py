"""The Python heap of a serving process: what startup leaves behind is kept out of the collector.

After startup a serving process holds a couple of hundred thousand long-lived objects (torch,
the tokenizer, the model's modules). CPython's collector walks all of them in every full
collection: about 130 ms on the embedded model's server, with the GIL held, so the event loop
and the engine thread both stop. Serving allocates steadily (a few objects per streamed token),
so full collections keep coming. Freezing the heap once startup is done moves those objects to
the permanent generation; later collections walk only what serving made (vLLM does the same).
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then exempt every object alive now from future collections; their count."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
