from setuptools import find_packages, setup

setup(
    name="forkproxy",
    version="0.1.0",
    description="A reverse proxy and API gateway as a WSGI app, for gunicorn's gevent workers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["forkproxy", "forkproxy.*"]),
    python_requires=">=3.10",
    install_requires=[
        "gevent>=24.10.1",
        "gunicorn[gevent]>=23",
        "packaging",  # gunicorn's gevent worker imports it
        "prometheus-client>=0.17",
        "urllib3>=2.2,<3",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "trustme"],
        "bench": ["werkzeug", "proxy.py", "py-spy"],
    },
    license="MIT",
)
