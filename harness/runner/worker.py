"""The serial executor's worker process: `python -m harness.runner.worker FD` (started by executors.JobProcess)."""
import sys

from harness.runner.executors import serve

if __name__ == "__main__":
    serve(int(sys.argv[1]))
