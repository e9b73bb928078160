"""How a request reaches an upstream, in one folder.

- ``members``: upstream base URLs, ``Upstream`` members and ``UpstreamPool``;
- ``balance``: choosing a member (smooth weighted round robin, least busy);
- ``health``: passive health of a member (failures, down time, the trial);
- ``transport``: the per-process urllib3 pools and sending with failover;
- ``exchange``: the one request-response exchange on a pooled connection;
- ``reply``: a response whose body is still on the wire;
- ``failures``: failures mapped to the contract's errors.
"""
