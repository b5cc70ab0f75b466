"""Host values onto the encoder's device without making the host wait for the device.

torch.tensor(values, device="cuda") and tensor.to("cuda") from ordinary (pageable) memory end with a
synchronisation of the stream: the host waits until every kernel queued before the copy has run. In the batch
path (resize.py's tables, per chunk; the decoder's index lists) that would keep the host's work on the next
chunk from overlapping the device's work on this one. Here the values go through pinned memory, in a
non-blocking copy queued on the current stream (torch's pinned allocator keeps the buffer until the copy is
done). On CPU it is a plain conversion.
"""

from __future__ import annotations

import numpy as np


def host_to_device(values, dtype, device):
    """`values` (a list, numpy array or CPU tensor) as a tensor of `dtype` (None: as it is) on `device`, queued,
    not waited for."""
    import torch

    if isinstance(values, torch.Tensor):
        tensor = values
    else:  # PIL's pixels are read-only memory, which torch warns about (once, on the actor's log): copied
        array = np.asarray(values)
        tensor = torch.as_tensor(array if array.flags.writeable else array.copy())
    tensor = tensor if dtype is None else tensor.to(dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
