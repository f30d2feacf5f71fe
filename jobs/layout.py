"""Where everything lives inside DEST: the one home of the output store's layout.

``artifacts/NAME/PRECISION/KEY/`` holds one conversion's files and ``artifacts/NAME/PRECISION/
KEY.json`` its completion record; ``.attempts/RUN_ID/JOB`` counts one run's task attempts;
``.cache/`` keeps what makes a refresh cheap (checkpoint hashes, the workers' facts);
``runs/RUN_ID.json`` is each run's history. Paths are relative to DEST (``jobs.store.Store``
turns them into URIs). Must not import ray, click or torch.
"""

from __future__ import annotations

ARTIFACT_FILE = "model.pt"          # the file quantizer.load_artifact takes
HASH_CACHE = ".cache/source-hashes.json"
FACTS_CACHE = ".cache/worker-facts.json"
TEMP_PREFIX = ".tmp-"               # a writer's temporary file or folder, renamed when whole


def artifact_dir(name: str, precision: str, key: str) -> str:
    """The folder of one conversion's files."""
    return f"artifacts/{name}/{precision}/{key}"


def artifact_file(name: str, precision: str, key: str) -> str:
    """The file ``quantizer.load_artifact`` takes."""
    return f"{artifact_dir(name, precision, key)}/{ARTIFACT_FILE}"


def record_path(name: str, precision: str, key: str) -> str:
    """The completion record a finished conversion leaves beside its folder."""
    return f"{artifact_dir(name, precision, key)}.json"


def attempts_dir(run_id: str) -> str:
    """One run's attempt counters (deleted when the run finishes)."""
    return f".attempts/{run_id}"


def attempts_path(run_id: str, job: str) -> str:
    """How many times this run started the task of ``job`` (a model, or model.precision)."""
    return f"{attempts_dir(run_id)}/{job}"


def run_record(run_id: str) -> str:
    return f"runs/{run_id}.json"
