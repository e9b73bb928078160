"""Everything that touches the server running forkproxy (gunicorn, the WSGI environ): the request
as it comes in (``inbound``), the worker's settings and environ keys (``worker``), access-log lines
(``accesslog``), a stopping worker (``shutdown``), trusted peers (``trust``).

Light on purpose: gunicorn's master imports ``forkproxy.server.accesslog``, which must not pull in
gevent or urllib3."""
