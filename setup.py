from setuptools import find_packages, setup

setup(
    name="forkproxy",
    version="0.1.0",
    description="A reverse proxy and API gateway as a WSGI app, for gunicorn's gevent workers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["forkproxy", "forkproxy.*"]),
    python_requires=">=3.10",
    # The releases the suite runs against. forkproxy overrides parts of urllib3's pools
    # and gunicorn's logger, and times its shutdown to gunicorn's: .ci/run also runs the
    # suite against the newest releases, so a new one that breaks them shows there first.
    install_requires=[
        "gevent>=26.9,<27",
        "gunicorn[gevent]>=27,<28",
        "packaging",  # gunicorn's gevent worker imports it
        "prometheus-client>=0.17,<1",
        "lmdb>=1.4,<4",  # the local limits store: shared by a machine's workers
        # The redis:// limits store (imported only when one is configured); hiredis parses replies in C.
        # Below 8: redis-py 8.1 measured ~45 us more CPU per command than 7.1 under gevent (scripts/bench --limits).
        "redis[hiredis]>=5,<8",
        "urllib3>=2.6,<2.9",  # 2.6: bounded decodes (max_length)
        "wsproto>=1.2,<2",  # WebSocket framing for tunnels with message hooks
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "trustme", "websockets>=13"],
        "bench": ["werkzeug", "proxy.py", "py-spy"],
    },
    license="MIT",
)
