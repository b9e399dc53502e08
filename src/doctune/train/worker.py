"""Entry point of one rank of a multi-process training job: `python -m doctune.train.worker job.json`."""

import sys
from pathlib import Path

from doctune.train.core import TrainJob
from doctune.train.launch import run_job

if __name__ == "__main__":
    run_job(TrainJob.load(Path(sys.argv[1])))
