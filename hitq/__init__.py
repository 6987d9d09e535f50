"""hitq: run vision-language-model benchmarks as a durable job queue."""

__version__ = "0.1.0"
