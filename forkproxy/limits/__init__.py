"""Rate limits and budgets: ``gcra`` (the algorithm, no I/O), the stores (``local``, ``redis_store``), ``limiter``."""
from forkproxy.limits.gcra import Limit

__all__ = ["Limit"]
