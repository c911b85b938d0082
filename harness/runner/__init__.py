"""The suite runner: suites -> plan -> job graph -> Ray or serial execution -> records (resumable)."""
