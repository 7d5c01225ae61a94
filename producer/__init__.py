"""clipfleet's submitting side: job specs, sources, enqueueing, job state and results.

Importing this package never imports torch or transformers.
"""

from producer.client import Client, Job
from producer.errors import ClipfleetError, InvalidJobSpec, JobNotFound
from producer.settings import Settings
from producer.spec import JobSpec
from producer.state import JobStatus

__all__ = ["Client", "ClipfleetError", "InvalidJobSpec", "Job", "JobNotFound", "JobSpec", "JobStatus", "Settings"]
