"""How a request reaches an upstream, in one folder.

- ``members``: upstream base URLs, ``Upstream`` members, ``UpstreamPool`` and a request's route through it;
- ``balance``: choosing a member (smooth weighted round robin, least busy);
- ``health``: passive health of a member (failures, down time, the trial);
- ``retry``: ``RetryPolicy`` and what it decides (urllib3's ``Retry`` counts the retries);
- ``attempts``: the attempt loop (``Transport.send``): failover, retries, waits, each attempt's start and end;
- ``connections``: the connections to one origin (a urllib3 connection pool) and the exchange on one;
- ``reply``: a response whose head is read and whose body is still on the wire;
- ``failures``: how an attempt fails before a usable head, typed where it fails; body read failures.
"""
