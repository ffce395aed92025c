from setuptools import find_packages, setup

setup(
    name="ingest",
    version="0.1.0",
    description="Collect Amazon deals from the Keepa API into SQLite, through crashes, restarts and token shortages.",
    packages=find_packages(include=["ingest", "ingest.*"]),
    package_data={"ingest": ["schema/*.sql", "schema/postgres/*.sql"]},
    python_requires=">=3.11",
    install_requires=[
        "click>=8.1",
        "requests>=2.31",
        # requests' own transport, declared for what the Keepa client uses directly: read1() with
        # decompression bounded per read (2.6+), so a gzip bomb cannot balloon between checks
        "urllib3>=2.6",
        "sqlite-utils>=3.36",
        "supervisor>=4.2",
        # CLI tables (sqlite-utils depends on it too; imported directly, so declared)
        "tabulate>=0.9",
        # Prometheus text format, /metrics HTTP server and collector API (ingest metrics);
        # the Prometheus project's own client, so the exposition is exactly what it parses
        "prometheus-client>=0.17",
    ],
    extras_require={
        # PostgreSQL as the shared state store (docs/postgres.md): psycopg 3, the maintained
        # driver; the binary wheel bundles libpq, so no compiler or libpq-dev is needed
        "postgres": ["psycopg[binary]>=3.1"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "freezegun>=1.4",
            # property tests for the analytics (arbitrary csv slots never crash it)
            "hypothesis>=6.100",
            # a real SMTP server on loopback for the email alert channel's tests (aio-libs)
            "aiosmtpd>=1.4",
            # the lease and ledger tests also run against a real PostgreSQL server
            "psycopg[binary]>=3.1",
        ],
    },
    entry_points={"console_scripts": ["ingest=ingest.cli:main"]},
)
