"""Sampling: request params (params.py), the running batch's device tensors (batch_info.py),
penalty state (penalties.py) and the batched sampler (sampler.py).

Only SamplingParams is re-exported here: it is what the API process needs, and it imports no
torch. The scheduler process imports the other modules directly.
"""
from kvyard.sampling.params import SamplingParams

__all__ = ["SamplingParams"]
