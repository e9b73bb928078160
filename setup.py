from setuptools import find_packages, setup

setup(
    name="forkproxy",
    version="0.1.0",
    description="A reverse proxy and API gateway as a WSGI app, for gunicorn's gevent workers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["forkproxy", "forkproxy.*"]),
    package_data={"forkproxy": ["py.typed"]},  # the public API's type hints are for type checkers (PEP 561)
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
        # The traces' tests run the SDK against a real OTLP receiver that decodes with opentelemetry-proto.
        "test": ["pytest>=8", "pytest-timeout", "trustme", "websockets>=13",
                 "opentelemetry-api>=1.45,<2", "opentelemetry-sdk>=1.45,<2",
                 "opentelemetry-exporter-otlp-proto-http>=1.45,<2", "opentelemetry-proto>=1.45,<2"],
        "bench": ["werkzeug", "proxy.py", "py-spy"],
        # Traces (forkproxy[otel]): imported only when tracing is on.
        "otel": ["opentelemetry-api>=1.45,<2", "opentelemetry-sdk>=1.45,<2",
                 "opentelemetry-exporter-otlp-proto-http>=1.45,<2"],
    },
    license="MIT",
    classifiers=["Typing :: Typed"],
)
