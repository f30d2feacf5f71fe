"""Remote stores for real: a loopback S3 server (moto), pyarrow's real S3 client, the real CLI.

The server is moto's ``ThreadedMotoServer`` on 127.0.0.1 (a free port), started once for the
module and stopped at its end. ``FaultProxy`` sits in front of it for the fault tests: it forwards
each request to moto, or answers ``503 Slow Down`` while a fault is armed. Checkpoints and
calibration shards live in the bucket, and so does DEST. Credentials are planted in the URIs'
user-info with recognizable values, so a test can grep everything written for them.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from click.testing import CliRunner

from jobs import store as store_mod
from jobs.cli import main
from jobs.store import Store, TransientStoreError

pytestmark = pytest.mark.slow

ACCESS_KEY, SECRET_KEY = "AKIAPLANTED0000KEY", "SeCrEtPlAnTeD-4f9b2c-secret"
BUCKET = "zoo-bucket"
MODELS = {   # name: (factory, kwargs, calibration folder)
    "residual-cnn": ("jobs.demo.models:ResidualCNN", {"width": 8, "blocks": 1}, "images"),
    "digits-mlp": ("jobs.demo.models:DigitsMLP", {"hidden": 32}, "flat"),
    "depthwise-cnn": ("jobs.demo.models:DepthwiseCNN", {"width": 8}, "images"),
    "tuple-output-cnn": ("jobs.demo.models:TupleOutputCNN", {}, "images"),
}


# -- a loopback S3 server and a fault-injecting proxy in front of it ---------------------------
class FaultProxy:
    """HTTP proxy to moto, one request per connection, answering 503 while a fault is armed.

    ``fail_next(n)`` fails the next n requests; ``fail_writes_when(marker, n)`` fails the n
    requests that follow the first write whose path contains ``marker`` (mid-run, in workers).
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.to_fail, self.trigger, self.failed, self.forwarded = 0, None, 0, 0
        self.writes_only = False
        threading.Thread(target=self._serve, daemon=True).start()

    def fail_next(self, n: int, writes_only: bool = False) -> None:
        with self.lock:
            self.to_fail, self.writes_only = n, writes_only

    def fail_writes_when(self, marker: bytes, n: int) -> None:
        with self.lock:
            self.trigger = (marker, n)

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _decide(self, method: bytes, path: bytes) -> bool:
        write = method in (b"PUT", b"POST", b"DELETE")
        with self.lock:
            if self.trigger and write and self.trigger[0] in path:
                self.to_fail, self.writes_only, self.trigger = self.trigger[1], True, None
            if self.to_fail and (write or not self.writes_only):
                self.to_fail -= 1
                self.failed += 1
                return True
            self.forwarded += 1
            return False

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                head, rest = _read_head(conn)
                lines = head.split(b"\r\n")
                method, path = lines[0].split(b" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(b":") for line in lines[1:] if line)}
                if self._decide(method, path):
                    body = b"" if method == b"HEAD" else _SLOW_DOWN
                    conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (len(body), body))
                    return
                if headers.get(b"expect", b"").lower() == b"100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                rest = _read_body(conn, headers, rest)
                kept = [line for line in lines[1:] if line and not line.lower().startswith(
                    (b"connection:", b"expect:"))]
                request = b"\r\n".join([lines[0], *kept, b"Connection: close", b"", b""]) + rest
                self._forward(conn, request)
            except (OSError, ValueError):
                pass

    def _forward(self, conn: socket.socket, request: bytes) -> None:
        with socket.create_connection(self.upstream) as up:
            up.sendall(request)
            head, rest = _read_head(up)
            kept = [line for line in head.split(b"\r\n") if line
                    and not line.lower().startswith(b"connection:")]
            conn.sendall(b"\r\n".join([*kept, b"Connection: close", b"", b""]) + rest)
            while chunk := up.recv(1 << 16):
                conn.sendall(chunk)


_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate (injected).</Message></Error>")


def _read_body(sock: socket.socket, headers: dict, data: bytes) -> bytes:
    """The raw request body: Content-Length bytes, or chunks up to the last (pyarrow streams)."""
    def need(n: int):
        nonlocal data
        while len(data) < n:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ValueError("connection closed inside the request body")
            data += chunk

    if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
        need(int(headers.get(b"content-length", b"0")))
        return data
    pos = 0
    while True:
        while b"\r\n" not in data[pos:]:
            need(len(data) + 1)
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol].split(b";")[0], 16)
        if size == 0:           # the last chunk, then trailers up to an empty line
            while not data.endswith(b"\r\n\r\n") or len(data) < eol + 4:
                need(len(data) + 1)
            return data
        need(eol + 2 + size + 2)
        pos = eol + 2 + size + 2


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ValueError("connection closed before the request head")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


@pytest.fixture(scope="module")
def s3_env():
    """Dummy credentials in the environment (pyarrow's and boto3's usual chain) for the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing-env-key")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing-env-secret")
        mp.setenv("AWS_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        yield mp


@pytest.fixture(scope="module")
def moto(s3_env):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = FaultProxy((host, port))
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                           allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    yield {"endpoint": f"{host}:{port}", "proxy": proxy, "fs": fs}
    proxy.close()
    server.stop()


def s3_uri(moto, path: str, *, via_proxy: bool = True, creds: bool = True) -> str:
    endpoint = f"127.0.0.1:{moto['proxy'].port}" if via_proxy else moto["endpoint"]
    user = f"{ACCESS_KEY}:{SECRET_KEY}@" if creds else ""
    return f"s3://{user}{BUCKET}/{path}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


@pytest.fixture(scope="module")
def s3_zoo(moto, tmp_path_factory):
    """Four tiny models' checkpoints and two calibration sets in the bucket; the zoo on disk."""
    from quantizer.calibration import write_calibration
    import quantizer

    fs, rng = moto["fs"], np.random.default_rng(0)
    images = rng.random((256, 1, 8, 8), dtype=np.float32)
    labels = rng.integers(0, 10, 256)
    write_calibration(f"{BUCKET}/src/calib/images", images, labels, rows_per_shard=96,
                      filesystem=fs)
    write_calibration(f"{BUCKET}/src/calib/flat", images.reshape(256, 64), labels,
                      rows_per_shard=96, filesystem=fs)
    entries = []
    for name, (factory, kwargs, calib) in MODELS.items():
        torch.manual_seed(len(name))
        model = quantizer.import_factory(factory)(**kwargs)
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        with fs.open_output_stream(f"{BUCKET}/src/ckpt/{name}.pt") as f:
            f.write(buf.getvalue())
        entries.append({"name": name, "factory": factory, "kwargs": kwargs,
                        "checkpoint": s3_uri(moto, f"src/ckpt/{name}.pt"),
                        "calibration": {"data": s3_uri(moto, f"src/calib/{calib}/")}})
    zoo = tmp_path_factory.mktemp("s3zoo") / "zoo.yaml"
    zoo.write_text(json.dumps({   # JSON is YAML
        "defaults": {"precisions": ["int8"], "calibration": {"batches": 4, "batch_size": 16}},
        "models": entries}))
    return zoo


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--json"])
    try:
        summary = json.loads(result.stdout)
    except json.JSONDecodeError:
        summary = None
    return result.exit_code, summary, result.output   # click 8.2: stdout and stderr mixed


def bucket_objects(moto, prefix: str) -> dict[str, bytes]:
    fs = moto["fs"]
    sel = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    out = {}
    for info in fs.get_file_info(sel):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path] = f.read()
    return out


# -- the store on S3 ----------------------------------------------------------------------------
def test_store_round_trip_with_endpoint_from_the_environment(moto, s3_env):
    s3_env.setenv("AWS_ENDPOINT_URL", f"http://{moto['endpoint']}")
    try:
        store = Store(f"s3://{BUCKET}/env-endpoint")
        store.write_json("a/b.json", {"x": 1})
        assert store.read_json("a/b.json") == {"x": 1}
        assert store.list_files("") == ["a/b.json"]
        assert store.read_bytes("a/missing") is None
        assert store.uri_of("a/b.json") == f"s3://{BUCKET}/env-endpoint/a/b.json"
    finally:
        s3_env.delenv("AWS_ENDPOINT_URL")


def test_transient_errors_are_retried_and_bounded(moto, monkeypatch):
    proxy, store = moto["proxy"], Store(s3_uri(moto, "retry"))
    before = proxy.failed
    proxy.fail_next(7)           # more than pyarrow's own 3 tries per request
    store.write_bytes("x.bin", b"payload")
    assert proxy.failed - before == 7
    proxy.fail_next(7)
    assert store.read_bytes("x.bin") == b"payload"
    monkeypatch.setattr(store_mod, "RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(store_mod, "RETRY_BASE_S", 0.01)
    proxy.fail_next(10_000)
    try:
        with pytest.raises(TransientStoreError, match=r"after 2 tries") as err:
            store.write_bytes("y.bin", b"never")
    finally:
        proxy.fail_next(0)
    assert SECRET_KEY not in str(err.value) and ACCESS_KEY not in str(err.value)
    assert store.read_bytes("y.bin") is None


def test_missing_bucket_exits_4_with_a_one_line_cause(moto, s3_zoo):
    dest = s3_uri(moto, "out").replace(BUCKET, "no-such-bucket")
    code, _, output = cli(s3_zoo, "--out", dest)
    assert code == 4, output
    message = [line for line in output.splitlines() if line.strip()]
    assert len(message) == 1 and "bucket 'no-such-bucket' does not exist" in message[0]
    assert SECRET_KEY not in output and ACCESS_KEY not in output


# -- the whole CLI on S3 ----------------------------------------------------------------------
def run_and_check(moto, zoo, prefix: str) -> tuple[dict, str]:
    """Convert into s3://BUCKET/PREFIX, check the manifest against the bucket, verify, rerun."""
    dest = s3_uri(moto, prefix)
    code, summary, output = cli(zoo, "--out", dest)
    assert code == 0, output
    assert summary["counts"] == {"ok": 4, "failed": 0, "skipped": 0}
    objects = bucket_objects(moto, prefix)
    manifest = json.loads(objects[f"{BUCKET}/{prefix}/manifest.json"])
    assert {r["name"] for r in manifest["rows"]} == set(MODELS)
    for row in manifest["rows"]:
        assert row["status"] == "ok" and row["quantized_fraction"] > 0.8, row
        assert row["artifact_uri"].startswith(f"s3://{BUCKET}/{prefix}/artifacts/{row['name']}/")
        assert row["source_uri"] == f"s3://{BUCKET}/src/ckpt/{row['name']}.pt?" \
            f"endpoint_override=127.0.0.1:{moto['proxy'].port}&scheme=http&region=us-east-1"
        folder = f"{BUCKET}/{prefix}/artifacts/{row['name']}/int8/{row['key']}"
        for f in row["files"]:
            data = objects[f"{folder}/{f['path']}"]
            assert len(data) == f["bytes"]
        assert f"{folder}.json" in objects              # the completion record
    assert f"{BUCKET}/{prefix}/.lock" not in objects
    assert any(k.startswith(f"{BUCKET}/{prefix}/runs/") for k in objects)
    code, verify, output = cli(zoo, "--out", dest, "--verify")
    assert code == 0 and verify["problems"] == 0 and len(verify["verify"]) == 4, output
    code, again, output2 = cli(zoo, "--out", dest)
    assert code == 0 and again["counts"] == {"ok": 0, "failed": 0, "skipped": 4}, output2
    return objects, output + output2


def test_zoo_in_s3_to_s3_converts_verifies_and_skips_on_rerun(ray_local, moto, s3_zoo):
    objects, output = run_and_check(moto, s3_zoo, "out")
    # no credential anywhere: not in any object written to the bucket, nor in the CLI output
    for name, data in bucket_objects(moto, "out").items():
        assert SECRET_KEY.encode() not in data and ACCESS_KEY.encode() not in data, name
    assert SECRET_KEY not in output and ACCESS_KEY not in output


def test_store_errors_mid_run_are_retried_and_nothing_is_lost(ray_local, moto, s3_zoo):
    proxy = moto["proxy"]
    before = proxy.failed
    # The first artifact upload (in a Ray worker) sets off 12 failed writes: pyarrow's own
    # retries, then Store's backoff, carry the workers' uploads and the driver's flushes through.
    proxy.fail_writes_when(b"/out-faults/artifacts/", 12)
    run_and_check(moto, s3_zoo, "out-faults")
    assert proxy.failed - before == 12


# -- integrity on S3 (issue 10, items 3 and 11) --------------------------------------------------
def test_a_calibration_folder_uri_with_a_query_is_hashed(moto):
    """Shard URIs keep the folder URI's ?endpoint_override=...: the data is part of the key."""
    from jobs.plan import SourceHasher
    from quantizer.calibration import write_calibration

    folder, rng = f"{BUCKET}/src/calib/changing", np.random.default_rng(1)
    rows = rng.random((64, 16), dtype=np.float32)
    write_calibration(folder, rows, rows_per_shard=32, filesystem=moto["fs"])
    uri = s3_uri(moto, "src/calib/changing/")
    first = SourceHasher(Store(s3_uri(moto, "hash-cache-1"))).digest_dataset(uri)
    assert len(first) == 64
    write_calibration(folder, rows * 2, rows_per_shard=32, filesystem=moto["fs"])
    assert SourceHasher(Store(s3_uri(moto, "hash-cache-2"))).digest_dataset(uri) != first


def _race_job(moto, dest: str, folder: Path):
    """One TinyMLP (fp16 + int8) with its checkpoint and calibration data in the bucket."""
    from jobs.convert import worker_facts
    from jobs.manifest import Manifest
    from jobs.plan import conversion_jobs, make_plan
    from jobs.sources import SourceHasher
    from jobs.zoo import load_zoo
    from quantizer.calibration import write_calibration
    from tests.jobs import fault_models as fm

    fs, rng = moto["fs"], np.random.default_rng(2)
    write_calibration(f"{BUCKET}/race/calib", rng.standard_normal((96, 16), dtype=np.float32),
                      filesystem=fs)
    buf = io.BytesIO()
    torch.save(fm.TinyMLP().state_dict(), buf)
    with fs.open_output_stream(f"{BUCKET}/race/m.pt") as f:
        f.write(buf.getvalue())
    zoo = folder / "race.yaml"
    zoo.write_text(json.dumps({"models": [{
        "name": "m", "factory": "tests.jobs.fault_models:TinyMLP",
        "checkpoint": s3_uri(moto, "race/m.pt"),
        "calibration": {"data": s3_uri(moto, "race/calib/"), "batches": 2, "batch_size": 16}}]}))
    store = Store(dest)
    units = make_plan(load_zoo(zoo), Manifest(), store, SourceHasher(store), worker_facts())
    (job,) = conversion_jobs(units, Manifest(), dest, "race-run")
    return job, store


def _describes_the_store(row: dict, store) -> bool:
    import hashlib

    folder = f"artifacts/{row['name']}/{row['precision']}/{row['key']}"
    return all(hashlib.sha256(store.read_bytes(f"{folder}/{f['path']}")).hexdigest() == f["sha256"]
               for f in row["files"])


def test_two_attempts_at_one_key_leave_rows_that_describe_the_stored_bytes(moto, tmp_path):
    """A task of a killed driver and the rerun's task convert the same key at once: the later
    one's uploads must not replace the files the earlier one's row describes."""
    from dataclasses import replace

    from jobs import layout
    from jobs.convert import convert_model

    job, store = _race_job(moto, s3_uri(moto, "race/out"), tmp_path)
    first = convert_model(job, store=store)
    for row in first:   # the second attempt started before the first wrote its records
        store.delete(layout.record_path("m", row["precision"], row["key"]))
    second = convert_model(job, store=store, attempt=2)
    assert [r["status"] for r in first + second] == ["ok"] * 4
    assert all(_describes_the_store(r, store) for r in first + second)
    forced = replace(job, precisions=tuple(replace(p, replace=True) for p in job.precisions))
    third = convert_model(forced, store=store, attempt=3)      # --force: fresh files win
    assert all(_describes_the_store(r, store) for r in third)
